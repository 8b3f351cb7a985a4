// Small progressive enhancements; every page works without them.
(function () {
  "use strict";
  // "Show password" toggles next to password fields.
  document.querySelectorAll("[data-reveal]").forEach(function (btn) {
    var input = document.getElementById(btn.getAttribute("data-reveal"));
    if (!input) { return; }
    btn.addEventListener("click", function () {
      var hidden = input.type === "password";
      input.type = hidden ? "text" : "password";
      btn.setAttribute("aria-pressed", hidden ? "true" : "false");
    });
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
