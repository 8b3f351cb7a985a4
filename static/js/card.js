// Card entry and 3-D Secure with stripe.js (js.stripe.com, or localstripe's copy in the demo and tests).
//
// New card: ask Voltpay for a SetupIntent (POST /wallet/cards/setup, CSRF header),
// hand the card fields to Stripe with stripe.confirmCardSetup, then tell Voltpay the
// setup id (POST /wallet/cards/finish) so the card is saved to the customer. Voltpay
// only ever receives ids: the card fields have no name, so no form submits them.
// Every text shown here comes from the page's data-msg-* attributes (translated).
(function () {
  "use strict";

  var stripeClient = null;
  function stripeFor(key) {
    if (typeof window.Stripe !== "function") { return null; }
    if (!stripeClient) { stripeClient = window.Stripe(key); }
    return stripeClient;
  }

  function postJSON(url, body, csrf, networkMessage) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify(body || {})
    }).catch(function () {
      throw new Error(networkMessage);
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) { throw new Error(data.detail || networkMessage); }
        return data;
      });
    });
  }

  // -- the card element inside a form (top-up form or "add a card") --------------------------------

  function CardEntry(root, form) {
    this.root = root;
    this.form = form;
    this.msg = function (name) { return root.getAttribute("data-msg-" + name) || ""; };
    this.error = form.querySelector("[data-card-error]");
    this.status = form.querySelector("[data-card-status]");
    this.submit = form.querySelector("[data-submit]");
    this.stripe = stripeFor(root.getAttribute("data-stripe-key"));
    this.touched = false;
    if (!this.stripe) {
      this.showError(this.msg("unavailable"));
      return;
    }
    this.card = this.stripe.elements().create("card");
    this.card.mount(root.querySelector("[data-card-element]"));
    var self = this;
    this.card.on("change", function () { self.touched = true; self.showError(""); });
  }

  CardEntry.prototype.showError = function (text) {
    if (!this.error) { return; }
    this.error.textContent = text;
    this.error.hidden = !text;
  };

  CardEntry.prototype.busy = function (on) {
    if (this.submit) { this.submit.disabled = on; }
    if (this.status) { this.status.textContent = on ? this.msg("working") : ""; }
  };

  // Save the typed card to the signed-in customer; resolves with the new payment method id.
  CardEntry.prototype.save = function () {
    var self = this;
    var csrf = this.root.getAttribute("data-csrf");
    var network = this.msg("network");
    if (!this.stripe) { return Promise.reject(new Error(this.msg("unavailable"))); }
    if (!this.touched) { return Promise.reject(new Error(this.msg("empty"))); }
    return postJSON(this.root.getAttribute("data-setup-url"), {}, csrf, network).then(function (setup) {
      return self.stripe.confirmCardSetup(setup.client_secret, { payment_method: { card: self.card } }).then(function (result) {
        if (result.error) {
          var detail = result.error.message && typeof result.error.message === "string" ? " " + result.error.message : "";
          throw new Error(self.msg("failed") + detail);
        }
        return postJSON(self.root.getAttribute("data-finish-url"), { setup_id: setup.setup_id }, csrf, network);
      });
    }).then(function (saved) { return saved.payment_method_id; });
  };

  // Save the card, then call done(paymentMethodId); on failure show why and call failed().
  CardEntry.prototype.run = function (done, failed) {
    var self = this;
    this.showError("");
    this.busy(true);
    this.save().then(done).catch(function (err) {
      self.busy(false);
      self.showError(err.message);
      if (failed) { failed(); }
    });
  };

  // Top-up form: a new card is saved first, then the form is sent with its id.
  var topUp = document.querySelector("[data-top-up-form]");
  if (topUp) {
    var root = topUp.querySelector("[data-card-entry]");
    var panel = topUp.querySelector("[data-new-card-panel]");
    var newChoice = topUp.querySelector("[data-new-card-choice]");
    var entry = root ? new CardEntry(root, topUp) : null;
    var showPanel = function () { if (panel && newChoice) { panel.hidden = !newChoice.checked; } };
    topUp.querySelectorAll("input[name=payment_method]").forEach(function (radio) {
      radio.addEventListener("change", showPanel);
    });
    showPanel();
    // Typing an amount chooses "Other"; choosing a preset leaves the typed amount aside.
    var other = topUp.querySelector("[data-other-amount]");
    var otherChoice = document.getElementById("preset-other");
    if (other && otherChoice) {
      other.addEventListener("input", function () { otherChoice.checked = true; });
      other.addEventListener("focus", function () { otherChoice.checked = true; });
    }
    var sending = false;
    topUp.addEventListener("submit", function (event) {
      if (sending) { event.preventDefault(); return; }  // one payment per tap
      if (!newChoice || !newChoice.checked || !entry) {
        sending = true;
        var button = topUp.querySelector("[data-submit]");
        if (button) { window.setTimeout(function () { button.disabled = true; }, 0); }
        return;
      }
      event.preventDefault();
      sending = true;
      entry.run(function (paymentMethodId) {
        topUp.querySelector("[data-new-payment-method]").value = paymentMethodId;
        topUp.submit();  // does not fire "submit" again
      }, function () { sending = false; });
    });
  }

  // Cards page: save the card, then show the list with it.
  var addCard = document.querySelector("[data-add-card-form]");
  if (addCard) {
    var addRoot = addCard.querySelector("[data-card-entry]");
    var addEntry = addRoot ? new CardEntry(addRoot, addCard) : null;
    addCard.addEventListener("submit", function (event) {
      event.preventDefault();
      if (!addEntry) { return; }
      addEntry.run(function () { window.location.assign(addCard.getAttribute("action")); });
    });
  }

  // Top-up result page: 3-D Secure with the bank, then ask Voltpay for the result.
  var confirmForm = document.querySelector("[data-confirm-form]");
  var confirm = document.querySelector("[data-confirm-payment]");
  if (confirm && confirmForm) {
    var stripe = stripeFor(confirm.getAttribute("data-stripe-key"));
    if (stripe) {
      // Whatever the outcome (passed, failed, closed), Voltpay asks Stripe and shows the result.
      stripe.confirmCardPayment(confirm.getAttribute("data-client-secret")).then(
        function () { confirmForm.submit(); },
        function () { confirmForm.submit(); }
      );
    }
  } else if (confirmForm && confirmForm.hasAttribute("data-check-after")) {
    var seconds = parseInt(confirmForm.getAttribute("data-check-after"), 10) || 3;
    window.setTimeout(function () { confirmForm.submit(); }, seconds * 1000);
  }
})();
