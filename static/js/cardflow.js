// The card flow card.js (wallet, meter top-ups, bills) and charging.js (the start form, the session page) share:
// stripe.js (js.stripe.com, or localstripe's copy in the demo and tests), Voltpay's JSON endpoints, the card element
// and 3-D Secure. Loaded before either of them, as window.VoltpayCard.
//
// A card entry asks Voltpay for a SetupIntent (data-setup-url, CSRF header), hands the card fields to Stripe with
// stripe.confirmCardSetup, and then, for a signed-in person, tells Voltpay the setup id (data-finish-url) so the card
// is saved to their customer. Voltpay only ever receives ids: the card fields have no name, so no form submits them.
// Every text shown here comes from the page's data-msg-* attributes (translated).
(function () {
  "use strict";

  var stripeClient = null;
  function stripeFor(key) {
    if (typeof window.Stripe !== "function" || !key) { return null; }
    if (!stripeClient) { stripeClient = window.Stripe(key); }
    return stripeClient;
  }

  // POST JSON; rejects with the problem's detail (and its field errors in err.fields), or networkMessage.
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
        if (!response.ok) {
          var err = new Error(data.detail || networkMessage);
          err.fields = data.errors || {};
          throw err;
        }
        return data;
      });
    });
  }

  // -- the card element inside a form ------------------------------------------------------------------

  // data-mode="guest": the card is not saved to an account; confirm() resolves with the SetupIntent's id.
  function CardEntry(root, form) {
    this.root = root;
    this.form = form;
    this.mode = root.getAttribute("data-mode");
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

  CardEntry.prototype.busy = function (on, text) {
    if (this.submit) { this.submit.disabled = on; }
    if (this.status) { this.status.textContent = on ? (text || this.msg("working")) : ""; }
  };

  // Confirm the typed card with Stripe; resolves with the id the form sends: the SetupIntent's (guest)
  // or the saved card's (signed in, after the finish call).
  CardEntry.prototype.confirm = function () {
    var self = this;
    var csrf = this.root.getAttribute("data-csrf");
    var network = this.msg("network");
    if (!this.stripe) { return Promise.reject(new Error(this.msg("unavailable"))); }
    if (!this.touched) { return Promise.reject(new Error(this.msg("empty"))); }
    var body = {};
    if (this.mode === "guest") {
      var email = this.form.querySelector("[data-guest-email]");
      body.email = email ? email.value : "";
    }
    return postJSON(this.root.getAttribute("data-setup-url"), body, csrf, network).then(function (setup) {
      return self.stripe.confirmCardSetup(setup.client_secret, { payment_method: { card: self.card } }).then(function (result) {
        if (result.error) {
          var detail = result.error.message && typeof result.error.message === "string" ? " " + result.error.message : "";
          throw new Error(self.msg("failed") + detail);
        }
        if (self.mode === "guest") { return setup.setup_id; }
        return postJSON(self.root.getAttribute("data-finish-url"), { setup_id: setup.setup_id }, csrf, network).then(function (saved) {
          return saved.payment_method_id;
        });
      });
    });
  };

  // Confirm the card, then call done(id); on failure show why and call failed(err).
  CardEntry.prototype.run = function (done, failed) {
    var self = this;
    this.showError("");
    this.busy(true);
    this.confirm().then(done).catch(function (err) {
      self.busy(false);
      self.showError(err.message);
      if (failed) { failed(err); }
    });
  };

  // The card element shows only while "a new card" ([data-new-card-choice]) is the chosen radio named radioName.
  function newCardPanel(form, radioName) {
    var panel = form.querySelector("[data-new-card-panel]");
    var newChoice = form.querySelector("[data-new-card-choice]");
    var showPanel = function () { if (panel && newChoice) { panel.hidden = !newChoice.checked; } };
    form.querySelectorAll("input[name=" + radioName + "]").forEach(function (radio) {
      radio.addEventListener("change", showPanel);
    });
    showPanel();
    return newChoice;
  }

  // One payment per tap: the form is sent once; when needsCard() the card goes first through withCard(retry),
  // which sends the form itself, or calls retry() to let the next tap try again.
  function sendOnce(form, needsCard, withCard) {
    var sending = false;
    form.addEventListener("submit", function (event) {
      if (sending) { event.preventDefault(); return; }
      sending = true;
      if (!needsCard()) {
        var button = form.querySelector("[data-submit]");
        if (button) { window.setTimeout(function () { button.disabled = true; }, 0); }
        return;
      }
      event.preventDefault();
      withCard(function () { sending = false; });
    });
  }

  // 3-D Secure with the bank; whatever the outcome (passed, failed, closed), the confirm form asks Voltpay for the result.
  function confirmPayment(confirmForm, confirm) {
    var stripe = stripeFor(confirm.getAttribute("data-stripe-key"));
    if (stripe) {
      stripe.confirmCardPayment(confirm.getAttribute("data-client-secret")).then(
        function () { confirmForm.submit(); },
        function () { confirmForm.submit(); }
      );
    }
  }

  window.VoltpayCard = {
    CardEntry: CardEntry, confirmPayment: confirmPayment, newCardPanel: newCardPanel, postJSON: postJSON, sendOnce: sendOnce,
    stripeFor: stripeFor
  };
})();
