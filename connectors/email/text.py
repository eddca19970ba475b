"""Mail bodies for people and for the bot: HTML to text, sanitised HTML, quote stripping.

No third-party converter: the standard library's ``HTMLParser`` turns HTML into text
(script, style and head content dropped; blocks become lines), and nh3 (ammonia) cleans
the HTML that agents may be shown. Quote stripping is a small routine: it keeps what the
customer wrote and drops quoted history (``>`` lines and everything after a reply header
such as "On ... wrote:" or Outlook's "From: / Sent:" block) and the signature ("-- ").
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import nh3

MAX_HTML_CHARS = 500_000  # longer HTML is cut before it is parsed or cleaned

_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
    "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul",
})
_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "svg"})
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "col", "area", "base", "wbr"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.quote_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip_depth += 1
            return
        if tag == "br":
            self.parts.append("\n")
        elif tag in _BLOCK:
            self.parts.append("\n")
            if tag == "li":
                self.parts.append("- ")
            elif tag == "blockquote":
                self.quote_depth += 1
            elif tag == "pre":
                self.pre_depth += 1
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK and tag != "li":  # the next item (or the list's end) breaks
            self.parts.append("\n")
            if tag == "blockquote":
                self.quote_depth = max(0, self.quote_depth - 1)
            elif tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            self.handle_starttag(tag, attrs)
        else:
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if not self.pre_depth:
            data = re.sub(r"\s+", " ", data)
        if self.quote_depth:  # quoted history in HTML mail: mark it like plain text does
            data = "\n".join("> " + line for line in data.split("\n"))
        self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Readable plain text of an HTML body (never raises on malformed markup)."""
    parser = _TextExtractor()
    try:
        parser.feed(markup[:MAX_HTML_CHARS])
        parser.close()
    except (AssertionError, ValueError):  # HTMLParser on pathological input
        pass
    lines = [line.strip() for line in "".join(parser.parts).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sanitize_html(markup: str) -> str:
    """HTML safe to show in an agent's page: no script, no event handlers, no javascript:."""
    return nh3.clean(markup[:MAX_HTML_CHARS])


def text_to_html(text: str) -> str:
    """A plain text as escaped HTML paragraphs (line breaks kept)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "".join(
        "<p>" + "<br>".join(html.escape(line) for line in p.split("\n")) + "</p>"
        for p in paragraphs
    )


# ---------------------------------------------------------------- quote stripping

_REPLY_HEADERS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^on\b.{0,300}\bwrote:?\s*$",  # English (Gmail, Apple Mail, Thunderbird)
        r"^am\b.{0,300}\bschrieb\b.{0,300}:\s*$",  # German
        r"^le\b.{0,300}\ba écrit\s*:\s*$",  # French
        r"^el\b.{0,300}\bescribió:?\s*$",  # Spanish
        r"^op\b.{0,300}\bschreef\b.{0,300}:\s*$",  # Dutch
        r"^il\b.{0,300}\bha scritto:?\s*$",  # Italian
        r"^em\b.{0,300}\bescreveu:?\s*$",  # Portuguese
        r"^-{2,}\s*original message\s*-{2,}\s*$",
        r"^-{2,}\s*(ursprüngliche nachricht|message d'origine|mensaje original)\s*-{2,}\s*$",
        r"^_{10,}\s*$",  # Outlook's rule above its header block
    )
]
_OUTLOOK_FROM = re.compile(r"^\*?(from|von|de|van|da)\s*:\*?\s", re.IGNORECASE)
_OUTLOOK_NEXT = re.compile(
    r"^\*?(sent|date|to|subject|gesendet|datum|an|betreff|envoyé|objet|enviado|asunto)\s*:",
    re.IGNORECASE,
)
_MOBILE_SIGNATURE = re.compile(
    r"^(sent from my \w[\w ]{0,40}|sent from (mail|outlook) for \w+|get outlook for \w+"
    r"|von meinem \w[\w ]{0,40} gesendet|envoyé de mon \w[\w ]{0,40})\.?\s*$",
    re.IGNORECASE,
)


def _is_reply_header(lines: list[str], index: int) -> bool:
    line = lines[index].strip()
    if any(p.match(line) for p in _REPLY_HEADERS):
        return True
    # "On Mon, 1 Jan 2024 at 10:00, Jane Doe <jane@example.com>\nwrote:" (wrapped)
    if index + 1 < len(lines):
        joined = line + " " + lines[index + 1].strip()
        if re.match(r"^on\b.{0,300}\bwrote:?\s*$", joined, re.IGNORECASE) and len(line) > 3:
            return True
    if _OUTLOOK_FROM.match(line):
        window = [lines[j].strip() for j in range(index + 1, min(index + 5, len(lines)))]
        return any(_OUTLOOK_NEXT.match(w) for w in window)
    return False


def strip_reply(text: str) -> str:
    """What the customer wrote in this mail, without quoted history or signature."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept: list[str] = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if _is_reply_header(lines, index):
            break
        if stripped in ("--", "-- ") or line == "-- ":  # RFC 3676 signature separator
            break
        if _MOBILE_SIGNATURE.match(stripped):
            break
        if stripped.startswith(">"):
            continue  # quoted (also inline quotes between the customer's answers)
        kept.append(line.rstrip())
    result = "\n".join(kept).strip()
    return re.sub(r"\n{3,}", "\n\n", result)
