"""Review of widget.js's ``poll`` attribute (7eeb524), in a real headless Chromium (the
fixtures of tests/test_widget_browser.py): "a page cannot make its visitors ask more often than
once a second" must hold for every value a page can write, large ones included."""

from __future__ import annotations

import asyncio

import pytest

from .helpers import Running
from .test_widget_browser import (  # noqa: F401  (fixtures)
    COUNTER,
    Browser,
    OtherOrigin,
    browser,
    chromium,
    embedding_page,
    site,
    supporters,
)

pytestmark = pytest.mark.timeout(90)

#: before the page loads: no EventSource (the widget polls), and each fetch of a campaign's
#: /count counted by campaign
COUNT_FETCHES = """
delete window.EventSource;
window.countFetches = {};
const realFetch = window.fetch;
window.fetch = function (url, options) {
  const m = String(url).match(/campaigns\\/(\\d+)\\/count/);
  if (m) window.countFetches[m[1]] = (window.countFetches[m[1]] || 0) + 1;
  return realFetch.apply(this, arguments);
};
"""


async def test_a_poll_interval_of_weeks_does_not_make_the_widget_poll_the_count_without_pause(
    browser: Browser,  # noqa: F811
    site: tuple[Running, str],  # noqa: F811
) -> None:
    running, url = site
    # 2,500,000 s (29 days) and 4,294,968 s (50 days): in milliseconds past what a timer's
    # delay holds (a 32-bit int: the browser wraps it to a negative or a small delay)
    await supporters(running, 46, 3)
    await supporters(running, 47, 4)
    body = (
        '<campaign-counter campaign="46" poll="2500000"></campaign-counter>'
        '<campaign-counter campaign="47" poll="4294968"></campaign-counter>'
    )
    async with (
        OtherOrigin(embedding_page(url, body, lang="en")) as page_url,
        browser.page(page_url, before_load=COUNT_FETCHES) as page,
    ):
        for cid, n in ((46, 3), (47, 4)):
            counter = COUNTER.format(cid=cid)
            await page.wait_for(f"{counter} && {counter}.value === {n}")
        await asyncio.sleep(2.5)
        fetches = await page.evaluate("window.countFetches")
    # the first poll when polling starts, and none of the next ones weeks later
    assert fetches["46"] <= 2, fetches
    assert fetches["47"] <= 2, fetches
