// Small progressive enhancements; every page works without them.
(function () {
  "use strict";
  // "Show password" / "Hide password" toggles next to password fields. The labels come
  // from the page (data-show-label, data-hide-label), so they are translated. The button
  // is hidden in the HTML and only shown here, where it can work.
  document.querySelectorAll("[data-reveal]").forEach(function (btn) {
    var input = document.getElementById(btn.getAttribute("data-reveal"));
    if (!input) { return; }
    var showLabel = btn.getAttribute("data-show-label") || btn.textContent;
    var hideLabel = btn.getAttribute("data-hide-label") || showLabel;
    btn.hidden = false;
    btn.addEventListener("click", function () {
      var reveal = input.type === "password";
      input.type = reveal ? "text" : "password";
      btn.textContent = reveal ? hideLabel : showLabel;
    });
    // Never leave a password readable in the form that gets submitted (or in the browser's form history).
    if (input.form) {
      input.form.addEventListener("submit", function () {
        input.type = "password";
        btn.textContent = showLabel;
      });
    }
  });
  // Move focus to the error summary so screen readers announce what to fix.
  var summary = document.querySelector("[data-autofocus]");
  if (summary) { summary.focus(); }
  // Change language as soon as one is picked.
  var lang = document.getElementById("lang-select");
  if (lang && lang.form) {
    lang.addEventListener("change", function () { lang.form.submit(); });
  }
})();
