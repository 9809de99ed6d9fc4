"""Screenshot a job's dashboard page, for the README: `python -m tests.dashboard.screenshot URL JOB_ID OUT.png`.

URL is where the service answers (http://127.0.0.1:8000). The page is captured once the job's curves are
drawn; docs/img/dashboard.png was made this way from a finished SmolLM2-135M job.
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright

from tests.dashboard.conftest import find_chromium


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("job_id")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not just the first screen")
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        raise SystemExit("no Chromium found (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(f"{args.url.rstrip('/')}/ui/#/jobs/{args.job_id}")
        page.wait_for_selector(".chart canvas")
        page.wait_for_timeout(1500)  # the last poll's points, and the charts at their final width
        page.screenshot(path=args.out, full_page=args.full_page)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
