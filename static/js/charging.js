// Charging pages: the start form's card entry, 3-D Secure, and the live session page.
//
// Start form, guest: static/js/cardflow.js (loaded first) asks Voltpay for a SetupIntent
// (POST /c/<code>/guest-card with the email) and hands the card fields to Stripe; the
// SetupIntent's id goes into the form, which is sent. Signed in with a new card: the same
// through the wallet's setup endpoints, which save the card; the form then sends its id.
//
// Session page: polls live.json every few seconds while the page is visible, stops when
// it is hidden (screen locked), and asks again at once when it comes back (visibilitychange,
// pageshow). A change of state reloads the page, which the server renders for that state.
// Every text shown here comes from the page's data-msg-* attributes (translated).
(function () {
  "use strict";

  var flow = window.VoltpayCard;  // static/js/cardflow.js, loaded first

  // -- the start form ------------------------------------------------------------------------------

  var startForm = document.querySelector("[data-start-form]");
  if (startForm) {
    var root = startForm.querySelector("[data-card-entry]");
    var entry = root ? new flow.CardEntry(root, startForm) : null;
    var newChoice = flow.newCardPanel(startForm, "payment");
    var needsCard = function () { return Boolean(entry && (entry.mode === "guest" || (newChoice && newChoice.checked))); };
    flow.sendOnce(startForm, needsCard, function (retry) {  // one start per tap
      entry.run(function (id) {
        var target = startForm.querySelector(entry.mode === "guest" ? "[data-setup-id]" : "[data-new-payment-method]");
        target.value = id;
        entry.busy(true, entry.msg("starting"));
        startForm.submit();  // does not fire "submit" again
      }, function (err) {
        retry();
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
    flow.confirmPayment(confirmForm, confirmPayment);
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
