"""Browser tests: headless Chromium against a live server, on a phone-sized screen."""
