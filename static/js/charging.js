// Charging pages: the start form's card entry, 3-D Secure, and the live session page.
//
// Start form, guest: ask Voltpay for a SetupIntent (POST /c/<code>/guest-card with the
// email, CSRF header), hand the card fields to Stripe with stripe.confirmCardSetup, put
// the SetupIntent's id into the form and send it. Signed in with a new card: the same
// through the wallet's setup endpoints, which save the card; the form then sends its id.
// Voltpay only ever receives ids: the card fields have no name, so no form submits them.
//
// Session page: polls live.json every few seconds while the page is visible, stops when
// it is hidden (screen locked), and asks again at once when it comes back (visibilitychange,
// pageshow). A change of state reloads the page, which the server renders for that state.
// Every text shown here comes from the page's data-msg-* attributes (translated).
(function () {
  "use strict";

  var stripeClient = null;
  function stripeFor(key) {
    if (typeof window.Stripe !== "function" || !key) { return null; }
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
        if (!response.ok) {
          var err = new Error(data.detail || networkMessage);
          err.fields = data.errors || {};
          throw err;
        }
        return data;
      });
    });
  }

  // -- the start form ------------------------------------------------------------------------------

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

  // Confirm the typed card with Stripe; resolves with the id the start form sends:
  // the SetupIntent's (guest) or the saved card's (signed in, after the wallet's finish call).
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

  var startForm = document.querySelector("[data-start-form]");
  if (startForm) {
    var root = startForm.querySelector("[data-card-entry]");
    var entry = root ? new CardEntry(root, startForm) : null;
    var panel = startForm.querySelector("[data-new-card-panel]");
    var newChoice = startForm.querySelector("[data-new-card-choice]");
    var showPanel = function () { if (panel && newChoice) { panel.hidden = !newChoice.checked; } };
    startForm.querySelectorAll("input[name=payment]").forEach(function (radio) {
      radio.addEventListener("change", showPanel);
    });
    showPanel();
    var sending = false;
    var button = startForm.querySelector("[data-submit]");
    startForm.addEventListener("submit", function (event) {
      if (sending) { event.preventDefault(); return; }  // one start per tap
      var needsCard = entry && (entry.mode === "guest" || (newChoice && newChoice.checked));
      sending = true;
      if (!needsCard) {
        if (button) { window.setTimeout(function () { button.disabled = true; }, 0); }
        return;
      }
      event.preventDefault();
      entry.showError("");
      entry.busy(true);
      entry.confirm().then(function (id) {
        var target = startForm.querySelector(entry.mode === "guest" ? "[data-setup-id]" : "[data-new-payment-method]");
        target.value = id;
        entry.busy(true, entry.msg("starting"));
        startForm.submit();  // does not fire "submit" again
      }).catch(function (err) {
        sending = false;
        entry.busy(false);
        entry.showError(err.message);
        if (err.fields && err.fields.email) {
          var email = startForm.querySelector("[data-guest-email]");
          if (email) { email.setAttribute("aria-invalid", "true"); email.focus(); }
        }
      });
    });
  }

  // -- the session page ----------------------------------------------------------------------------

  // 3-D Secure with the bank, then ask Voltpay to check the hold and start the charger.
  var confirmForm = document.querySelector("[data-confirm-form]");
  var confirmPayment = document.querySelector("[data-confirm-payment]");
  if (confirmForm && confirmPayment) {
    var stripe = stripeFor(confirmPayment.getAttribute("data-stripe-key"));
    if (stripe) {
      // Whatever the outcome (passed, failed, closed), Voltpay asks Stripe and shows the result.
      stripe.confirmCardPayment(confirmPayment.getAttribute("data-client-secret")).then(
        function () { confirmForm.submit(); },
        function () { confirmForm.submit(); }
      );
    }
  }

  // One tap on Stop (or Cancel) sends one request.
  var stopForm = document.querySelector("[data-stop-form]");
  if (stopForm) {
    var stopping = false;
    stopForm.addEventListener("submit", function (event) {
      if (stopping) { event.preventDefault(); return; }
      stopping = true;
      var b = stopForm.querySelector("button");
      if (b) { window.setTimeout(function () { b.disabled = true; }, 0); }
    });
  }

  // The plug-in countdown: from the seconds the server gave, corrected by each poll.
  var countdown = document.querySelector("[data-countdown]");
  var countdownEnd = null;
  function setCountdown(seconds) {
    if (!countdown || seconds === null || seconds === undefined) { return; }
    countdownEnd = Date.now() + seconds * 1000;
    tickCountdown();
  }
  function tickCountdown() {
    if (!countdown || countdownEnd === null) { return; }
    var left = Math.max(0, Math.round((countdownEnd - Date.now()) / 1000));
    countdown.textContent = Math.floor(left / 60) + ":" + ("0" + (left % 60)).slice(-2);
  }
  if (countdown) {
    setCountdown(parseInt(countdown.getAttribute("data-seconds"), 10) || 0);
    window.setInterval(tickCountdown, 1000);
  }

  var live = document.querySelector("[data-live]");
  if (live && live.getAttribute("data-ended") !== "true" && !confirmPayment) {
    var url = live.getAttribute("data-url");
    var shownState = live.getAttribute("data-state");
    var interval = (parseInt(live.getAttribute("data-interval"), 10) || 3) * 1000;
    var timer = null;
    var inFlight = false;
    var reloading = false;

    var schedule = function () {
      window.clearTimeout(timer);
      timer = null;
      if (document.visibilityState === "visible" && !reloading) { timer = window.setTimeout(poll, interval); }
    };

    var show = function (data) {
      if (data.state !== shownState) {  // a new state has its own page: let the server render it
        reloading = true;
        window.location.reload();
        return;
      }
      var display = data.display || {};
      live.querySelectorAll("[data-live-field]").forEach(function (el) {
        var value = display[el.getAttribute("data-live-field")];
        if (typeof value === "string" && el.textContent !== value) { el.textContent = value; }
      });
      setCountdown(data.start_seconds_left);
    };

    var poll = function () {
      if (inFlight || reloading) { return; }
      inFlight = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" }, cache: "no-store" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (data) { if (data) { show(data); } })
        .catch(function () { /* offline for a moment: the next poll tries again */ })
        .then(function () { inFlight = false; schedule(); });
    };

    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "visible") { poll(); } else { window.clearTimeout(timer); timer = null; }
    });
    window.addEventListener("pageshow", function (event) { if (event.persisted) { poll(); } });
    schedule();
  }
})();
