"""Dashboard tests: the page at /ui driven in a real headless Chromium against a real `svfit serve`."""
