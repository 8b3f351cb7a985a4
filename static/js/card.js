// Wallet, meter top-up and bill pages: the top-up form, "add a card", and 3-D Secure on a payment's result page.
//
// New card: static/js/cardflow.js (loaded first) asks Voltpay for a SetupIntent, hands the card fields to
// Stripe and saves the card to the customer (POST /wallet/cards/setup, /wallet/cards/finish, or a meter's
// guest-card endpoints); the form is then sent with the card's id only.
(function () {
  "use strict";

  var flow = window.VoltpayCard;

  // Top-up form: a new card is saved first, then the form is sent with its id.
  var topUp = document.querySelector("[data-top-up-form]");
  if (topUp) {
    var root = topUp.querySelector("[data-card-entry]");
    var entry = root ? new flow.CardEntry(root, topUp) : null;
    var newChoice = flow.newCardPanel(topUp, "payment_method");
    // Typing an amount chooses "Other"; choosing a preset leaves the typed amount aside.
    var other = topUp.querySelector("[data-other-amount]");
    var otherChoice = document.getElementById("preset-other");
    if (other && otherChoice) {
      other.addEventListener("input", function () { otherChoice.checked = true; });
      other.addEventListener("focus", function () { otherChoice.checked = true; });
    }
    flow.sendOnce(topUp, function () { return Boolean(newChoice && newChoice.checked && entry); }, function (retry) {
      entry.run(function (paymentMethodId) {
        topUp.querySelector("[data-new-payment-method]").value = paymentMethodId;
        topUp.submit();  // does not fire "submit" again
      }, retry);
    });
  }

  // Cards page: save the card, then show the list with it.
  var addCard = document.querySelector("[data-add-card-form]");
  if (addCard) {
    var addRoot = addCard.querySelector("[data-card-entry]");
    var addEntry = addRoot ? new flow.CardEntry(addRoot, addCard) : null;
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
    flow.confirmPayment(confirmForm, confirm);
  } else if (confirmForm && confirmForm.hasAttribute("data-check-after")) {
    var seconds = parseInt(confirmForm.getAttribute("data-check-after"), 10) || 3;
    window.setTimeout(function () { confirmForm.submit(); }, seconds * 1000);
  }
})();
