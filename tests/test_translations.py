"""The catalogs: complete in Chinese, in step with the code, and nothing visible outside them.

`make translations` extracts the messages (babel.cfg), updates the catalogs and
compiles them. These tests fail when a msgid has no Chinese translation (or a broken
one), when translations/messages.pot or the .po is behind the sources, when the
compiled .mo is behind the .po, or when a template shows text, a tooltip, a placeholder,
an accessible label, an image description or a button's value that is not a message.
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po
from jinja2 import Environment

ROOT = Path(__file__).resolve().parent.parent
POT = ROOT / "translations" / "messages.pot"
PO = ROOT / "translations" / "zh_CN" / "LC_MESSAGES" / "messages.po"
MO = PO.with_suffix(".mo")
TEMPLATES = sorted((ROOT / "templates").rglob("*.html"))
VISIBLE_ATTRIBUTES = ("title", "placeholder", "aria-label", "alt")
BUTTON_INPUTS = ("submit", "button", "reset")
LETTER = re.compile(r"[^\W\d_]")  # any script's letters; digits and symbols are not words


MARK = "\u2063"  # stands for a Jinja tag: invisible, not a letter


def key(value: str | list | tuple) -> str | tuple:
    """A msgid or msgstr, plural forms as a tuple."""
    return value if isinstance(value, str) else tuple(value)


def ids(path: Path) -> set:
    with path.open("rb") as f:
        return {key(m.id) for m in read_po(f) if m.id}


def test_every_message_has_a_chinese_translation() -> None:
    with PO.open("rb") as f:
        catalog = read_po(f)
    missing, fuzzy = [], []
    for message in catalog:
        if not message.id:
            continue
        strings = [message.string] if isinstance(message.string, str) else message.string
        if not all(strings):
            missing.append(message.id)
        if message.fuzzy:
            fuzzy.append(message.id)
    assert not missing, f"no zh_CN translation for: {missing}"
    assert not fuzzy, f"fuzzy (unreviewed) zh_CN translations: {fuzzy}"
    broken = [(m.id, [str(e) for e in errors]) for m, errors in catalog.check() if errors]
    assert not broken, f"translations whose placeholders do not match: {broken}"


def test_the_template_is_in_step_with_the_sources(tmp_path: Path) -> None:
    fresh = tmp_path / "messages.pot"
    pybabel = Path(sys.executable).parent / "pybabel"
    # The same command as `make translations`.
    subprocess.run(
        [str(pybabel), "extract", "-F", "babel.cfg", "-k", "_l", "-o", str(fresh), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    current = ids(fresh)
    assert current, "extraction found no messages: is babel.cfg right?"
    stale, gone = current - ids(POT), ids(POT) - current
    assert not stale and not gone, (
        f"translations/messages.pot is stale (run `make translations`): "
        f"new {sorted(map(str, stale))}, removed {sorted(map(str, gone))}"
    )


def test_the_chinese_catalog_is_in_step_with_the_template() -> None:
    assert ids(PO) == ids(POT), "run `make translations` to update the zh_CN catalog"


def test_the_compiled_catalog_matches_the_po() -> None:
    assert MO.exists(), "no compiled catalog: run `make translations` (make run/test do it)"
    with PO.open("rb") as f:
        source = {key(m.id): key(m.string) for m in read_po(f) if m.id}
    with MO.open("rb") as f:
        compiled = {key(m.id): key(m.string) for m in read_mo(f) if m.id}
    assert compiled == source, "the .mo is behind the .po: run `make translations`"


class VisibleText(HTMLParser):
    """Collects what a person would read in an HTML fragment: text and visible attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._hidden = 0  # inside <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._hidden += 1
        values = dict(attrs)
        shown = [values.get(name) for name in VISIBLE_ATTRIBUTES]
        if tag == "input" and values.get("type") in BUTTON_INPUTS:
            shown.append(values.get("value"))
        self.found += [v.replace(MARK, " ").strip() for v in shown if v and LETTER.search(v)]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden and LETTER.search(data):
            self.found.append(data.replace(MARK, " ").strip())


def untranslated(source: str) -> list[str]:
    """The visible text of a template that is written out rather than a message."""
    # Only the template's literal text can show untranslated words: every {{ ... }},
    # {% ... %} and {# ... #} becomes an invisible mark.
    html, inside = [], False
    for _line, kind, value in Environment(extensions=["jinja2.ext.i18n"]).lex(source):
        if kind == "data":
            html.append(value)
            inside = False
        elif not inside:
            html.append(MARK)
            inside = True
    parser = VisibleText()
    parser.feed("".join(html))
    parser.close()
    return parser.found


def test_the_checker_finds_text_outside_the_catalogs() -> None:
    assert untranslated("<p>Hello {{ name }}</p>") == ["Hello"]
    assert untranslated('<input type="submit" value="Go">') == ["Go"]
    assert untranslated('<a title="Details" href="/x">{{ _("Details") }}</a>') == ["Details"]
    assert untranslated('<img alt="图片">') == ["图片"]
    assert untranslated('<p title="{{ _("Why") }}">{{ _("Hello") }} · 42 → ←</p>') == []
    assert untranslated("<script>const words = 'ignored';</script>{# note #}") == []


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_show_nothing_outside_the_catalogs(template: Path) -> None:
    assert untranslated(template.read_text()) == []
