"""A real browser reviews a real field with the keyboard (fields.js, POST /samples/{id}/reviews), adds a
missed cell by clicking it, prints the report, finds the sample again in the Samples tab, adds a field to
it; and the same on a phone's screen."""
# ruff: noqa: F811 (the fixtures server and browser are test_browser's, imported by name)

from __future__ import annotations

import json
import urllib.request

import pytest
from test_browser import _fields_mode, _phone, _shot, _text, _wait_analysed, browser, server  # noqa: F401

pytestmark = pytest.mark.browser
SAMPLE = "browser slide 7"
WHO = "Test Reviewer"


def _get(server, path):
    with urllib.request.urlopen(server + path, timeout=30) as r:
        return r.read().decode()


def _items(browser):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#gallery-list .gallery-item")


def _marks(browser):
    """'cell mark' of each gallery item, read at once (the gallery is drawn again after each decision)."""
    return browser.execute_script("""return [...document.querySelectorAll('#gallery-list .gallery-item')]
        .map((b) => b.dataset.cell + ' ' + b.querySelector('.g-mark').textContent)""")


def _wait(browser, what, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(what)


def _type(browser, id_, text):
    from selenium.webdriver.common.by import By

    e = browser.find_element(By.ID, id_)
    e.clear()
    e.send_keys(text)


def _review_row(browser, name):
    return browser.execute_script("""for (const tr of document.querySelectorAll('#review-rows tr'))
        if (tr.cells[0].textContent === arguments[0]) return [tr.cells[1].textContent, tr.cells[2].textContent];""", name)


def test_review_a_real_field_with_the_keyboard_and_find_it_again(server, browser, samples):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _fields_mode(browser, server)
    _type(browser, "sample-id", SAMPLE)
    _type(browser, "reviewer", WHO)
    browser.find_element(By.ID, "field-input").send_keys(str(samples / "fields" / "PA171771.JPG"))
    _wait_analysed(browser)
    rec = browser.execute_script("return window.__smear[window.__smear.length - 1]")["fields"][0]
    assert rec["sample"] == SAMPLE and rec["field_id"] >= 1
    called = sorted((i for i, c in enumerate(rec["cells"]) if c["label"] == "Parasitized" and not c["ood"]),
                    key=lambda i: -rec["cells"][i]["p_parasitized"])
    assert len(called) >= 3, "the real field has three calls to review"
    _wait(browser, lambda d: d.find_element(By.ID, "review-summary").is_displayed())
    assert _text(browser, "review-status").startswith("Not reviewed yet")
    assert browser.find_element(By.ID, "sample-id").get_attribute("readonly")  # one sample on the page
    assert [m.split(" ", 1)[1] for m in _marks(browser)] == ["not reviewed"] * len(called)

    # keyboard only: the first call rejected (N), the next confirmed (Y), the third re-staged (T); the
    # server's first answer held back 1.5 s: the next cell is selected at once, and the decisions are kept
    # and drawn in the order they were made
    browser.execute_script("""const orig = window.fetch; let first = true;
        window.fetch = async (u, o) => { const r = await orig(u, o);
          if (first && String(u).endsWith('/reviews')) { first = false; await new Promise((ok) => setTimeout(ok, 1500)); }
          return r; };""")
    _items(browser)[0].send_keys("n")
    assert browser.switch_to.active_element.get_attribute("data-cell") == str(called[1])  # on to the next, at once
    browser.switch_to.active_element.send_keys("y")
    _wait(browser, lambda d: _marks(d)[:2] == [f"{called[0]} ✗ rejected", f"{called[1]} ✓ confirmed"])
    browser.switch_to.active_element.send_keys("t")
    _wait(browser, lambda d: _marks(d)[2] == f"{called[2]} ✓ re-staged")
    _wait(browser, lambda d: f"3 of {len(called)} called cells decided" in _text(d, "review-status"))
    assert WHO in _text(browser, "review-status")
    assert _review_row(browser, "Parasitized") == [str(len(called)), str(len(called) - 1)]
    assert "trophozoite" in _review_row(browser, "By stage")[1]
    field = browser.find_element(By.CSS_SELECTOR, "#fields-results .field-card")
    rect = field.find_element(By.CSS_SELECTOR, f"rect.cell[data-cell='{called[0]}']")
    assert "rejected" in rect.get_attribute("class").split()
    _shot(browser, "review-desktop-gallery")
    browser.execute_script("window.scrollTo(0, 0)")
    _shot(browser, "review-desktop-top")
    browser.execute_script("document.getElementById('review-summary').scrollIntoView()")
    _shot(browser, "review-desktop-summary")

    # a missed cell: A in the field, then a click where no object is
    free = next((x, y) for y in range(60, rec["height"] - 60, 20) for x in range(60, rec["width"] - 60, 20)
                if not any(b[0] - 10 <= x <= b[2] + 10 and b[1] - 10 <= y <= b[3] + 10 for b in
                           (c["box"] for c in rec["cells"])))
    view = field.find_element(By.CSS_SELECTOR, ".field-view")
    view.send_keys("0")
    # a click on a called cell in the field selects it there: outlined, the bar on it, focus kept in the field
    b = rec["cells"][called[1]]["box"]
    off = browser.execute_script("""const r = arguments[0].querySelector('.field-stage').getBoundingClientRect(),
        v = arguments[0].getBoundingClientRect();
        return [r.left - v.left - v.width / 2 + arguments[1] * r.width / arguments[3],
                r.top - v.top - v.height / 2 + arguments[2] * r.height / arguments[4]];""",
                                 view, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, rec["width"], rec["height"])
    ActionChains(browser).move_to_element_with_offset(view, round(off[0]), round(off[1])).click().perform()
    assert f"cell {called[1]}:" in _text(browser, "review-which") and browser.switch_to.active_element == view
    assert "focus" in field.find_element(By.CSS_SELECTOR, f"rect.cell[data-cell='{called[1]}']").get_attribute("class")
    view.send_keys("a")
    assert "adding" in view.get_attribute("class") and "Click (or tap)" in _text(browser, "fields-status")
    off = browser.execute_script("""const r = arguments[0].querySelector('.field-stage').getBoundingClientRect(),
        v = arguments[0].getBoundingClientRect();
        return [r.left - v.left - v.width / 2 + arguments[1] * r.width / arguments[3],
                r.top - v.top - v.height / 2 + arguments[2] * r.height / arguments[4]];""",
                                 view, free[0], free[1], rec["width"], rec["height"])
    ActionChains(browser).move_to_element_with_offset(view, round(off[0]), round(off[1])).click().perform()
    _wait(browser, lambda d: "1 added" in _text(d, "review-status"))
    assert "Added an infected cell" in _text(browser, "fields-status")
    assert field.find_elements(By.CSS_SELECTOR, "rect.cell.added")
    assert _review_row(browser, "Parasitized") == [str(len(called)), str(len(called))]
    # undo: the rejected call back to the model's (U)
    first = next(i for i in _items(browser) if i.get_attribute("data-cell") == str(called[0]))
    first.send_keys("u")
    _wait(browser, lambda d: any(m == f"{called[0]} not reviewed" for m in _marks(d)))

    # what the server keeps: every decision with who made it; the printable report shows both counts
    kept = json.loads(_get(server, "/samples/" + urllib.request.quote(SAMPLE)))
    assert [d["action"] for d in kept["reviews"]] == ["reject", "confirm", "stage", "add", "clear"]
    assert {d["reviewer"] for d in kept["reviews"]} == {WHO}
    assert kept["reviewed"]["n_parasitized"] == len(called) + 1
    # "nothing more to change" marks the field as looked at
    browser.find_element(By.ID, "review-seen").click()
    _wait(browser, lambda d: json.loads(_get(server, "/samples/" + urllib.request.quote(SAMPLE)))["reviews"][-1]["action"]
          == "seen")
    _wait(browser, lambda d: _text(d, "fields-status") == f"1 field marked as looked at by {WHO}.")
    link = browser.find_element(By.ID, "print-report")
    assert link.is_displayed() and link.get_attribute("target") == "_blank"
    page = _get(server, link.get_attribute("href").removeprefix(server))
    assert "<th>Reviewed</th>" in page and WHO in page and "Malaria thin-smear report: browser slide 7" in page

    # the Samples tab finds it again; Open shows it from the stored picture, with its review
    browser.find_element(By.ID, "tab-samples").click()
    _wait(browser, lambda d: SAMPLE in _text(d, "samples-rows"))
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#samples-rows tr") if r.text.startswith(SAMPLE))
    assert "decided by Test Reviewer" in row.text
    _shot(browser, "review-desktop-samples")
    row.find_element(By.TAG_NAME, "button").click()
    _wait(browser, lambda d: _text(d, "fields-status").startswith(f"Sample {SAMPLE}: 1 stored field"))
    assert browser.find_element(By.ID, "mode-fields").is_displayed()
    _wait(browser, lambda d: len(_marks(d)) == len(called) + 1)
    assert f"{called[1]} ✓ confirmed" in _marks(browser) and any("added" in m for m in _marks(browser))
    img = browser.find_element(By.CSS_SELECTOR, "#fields-results .field-img")
    assert "/picture" in img.get_attribute("src") and browser.execute_script("return arguments[0].naturalWidth", img)
    # add a field to this sample
    browser.find_element(By.ID, "field-input").send_keys(str(samples / "fields" / "PA171772.JPG"))
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#fields-results .field-card .field-view")) == 2,
          timeout=60)
    _wait(browser, lambda d: json.loads(_get(server, "/samples/" + urllib.request.quote(SAMPLE)))["summary"]["n_fields"]
          == 2)

    # Clear starts a new sample; the cleared one stays on the server
    browser.find_element(By.ID, "fields-clear").click()
    new_id = browser.find_element(By.ID, "sample-id").get_attribute("value")
    assert new_id != SAMPLE and not browser.find_element(By.ID, "sample-id").get_attribute("readonly")
    assert SAMPLE in _text(browser, "fields-status")
    browser.find_element(By.ID, "tab-samples").click()
    _wait(browser, lambda d: SAMPLE in _text(d, "samples-rows"))
    next(r for r in browser.find_elements(By.CSS_SELECTOR, "#samples-rows tr") if r.text.startswith(SAMPLE)
         ).find_element(By.TAG_NAME, "button").click()
    _wait(browser, lambda d: _text(d, "fields-status").startswith(f"Sample {SAMPLE}: 2 stored fields"))

    # a phone: nothing wider than the screen, the review bar's buttons on it
    _phone(browser, True)
    try:
        next(i for i in _items(browser) if i.get_attribute("aria-label").startswith(f"PA171771.JPG, cell {called[0]}:")
             ).click()
        browser.execute_script("document.getElementById('fields-gallery').scrollIntoView()")
        bar = browser.find_element(By.ID, "review-bar")
        assert bar.is_displayed() and str(called[0]) in _text(browser, "review-which")
        bar.find_element(By.CSS_SELECTOR, "button[data-act=confirm]").click()  # a tap on the bar
        _wait(browser, lambda d: f"{called[0]} ✓ confirmed" in _marks(d))
        width = browser.execute_script("return document.documentElement.clientWidth")
        for b in bar.find_elements(By.TAG_NAME, "button"):
            r = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.right]", b)
            assert 0 <= r[0] and r[1] <= width + 1, (b.text, r, width)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width + 1
        _shot(browser, "review-phone-gallery")
        browser.find_element(By.ID, "tab-samples").click()
        _wait(browser, lambda d: SAMPLE in _text(d, "samples-rows"))
        _shot(browser, "review-phone-samples")
        opener = browser.find_element(By.CSS_SELECTOR, "#samples-rows button")  # a card: Open on the screen
        right = browser.execute_script("return arguments[0].getBoundingClientRect().right", opener)
        assert right <= width + 1 and browser.execute_script("return document.documentElement.scrollWidth") <= width + 1
    finally:
        _phone(browser, False)
