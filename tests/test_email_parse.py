"""The email connector's pure parts: parsing untrusted mail, quote stripping, HTML, threading
tokens, button choices and outbound rendering; and hypothesis fuzzing of the parser."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from connectors.email.connector import inbound_message
from connectors.email.parse import Limits, ParsedMail, Rejected, parse_mail
from connectors.email.render import (
    HeaderInjection,
    Outgoing,
    OutgoingFile,
    build,
    reply_subject,
)
from connectors.email.text import html_to_text, sanitize_html, strip_reply
from connectors.email.threads import Thread, choice, token_for
from gateway.model import Button

LIMITS = Limits()
BUTTONS = [Button(title="Opening hours", value="faq:hours"),
           Button(title="Shipping costs", value="faq:shipping"),
           Button(title="Talk to a human", value="handoff")]


def raw(headers: str, body: str = "hello") -> bytes:
    return (headers.strip().replace("\n", "\r\n") + "\r\n\r\n" + body).encode()


# ------------------------------------------------------------------ parsing


def test_plain_mail_is_read() -> None:
    parsed = parse_mail(raw("""
From: "Doe, Jane" <Jane.Doe@Example.COM>
To: support@omnigate.test, other@x.test
Cc: boss@example.com
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=
Message-ID: <abc@example.com>
In-Reply-To: <p1@omnigate.test>
References: <r0@x> <p1@omnigate.test>
Date: Tue, 24 Nov 2026 08:00:00 +0100
"""), LIMITS)
    assert parsed.sender == "jane.doe@example.com" and parsed.sender_name == "Doe, Jane"
    assert parsed.recipients == ["support@omnigate.test", "other@x.test", "boss@example.com"]
    assert parsed.subject == "Grüße"
    assert parsed.external_id == parsed.message_id == "<abc@example.com>"
    assert parsed.in_reply_to == ["<p1@omnigate.test>"]
    assert parsed.references == ["<r0@x>", "<p1@omnigate.test>"]
    assert parsed.date is not None and parsed.date.hour == 7
    assert parsed.text == "hello" and parsed.automatic is None and parsed.problem is None


def test_no_message_id_uses_a_hash_of_the_bytes() -> None:
    one = parse_mail(raw("From: a@b.test"), LIMITS)
    two = parse_mail(raw("From: a@b.test", "other"), LIMITS)
    assert one.external_id.startswith("sha256:") and one.message_id is None
    assert one.external_id != two.external_id


def test_no_sender_is_rejected_and_the_envelope_sender_is_a_fallback() -> None:
    with pytest.raises(Rejected):
        parse_mail(raw("Subject: x"), LIMITS)
    with pytest.raises(Rejected):
        parse_mail(raw("From: not an address"), LIMITS)
    assert parse_mail(raw("Subject: x"), LIMITS, envelope_from="bob@x.test").sender == "bob@x.test"


@pytest.mark.parametrize(("headers", "reason"), [
    ("Auto-Submitted: auto-replied", "Auto-Submitted"),
    ("Auto-Submitted: auto-generated; type=x", "Auto-Submitted"),
    ("Precedence: bulk", "Precedence"),
    ("Precedence: list", "Precedence"),
    ("Precedence: junk", "Precedence"),
    ("List-Id: <news.shop.test>", "mailing list"),
    ("Return-Path: <>", "bounce"),
    ("X-Autoreply: yes", "x-autoreply"),
])
def test_automatic_mail_is_recognised(headers: str, reason: str) -> None:
    parsed = parse_mail(raw(f"From: a@b.test\n{headers}"), LIMITS)
    assert parsed.automatic is not None and reason in parsed.automatic


def test_mailer_daemon_and_auto_submitted_no() -> None:
    assert parse_mail(raw("From: MAILER-DAEMON@mx.test"), LIMITS).automatic
    assert parse_mail(raw("From: a@b.test\nAuto-Submitted: no"), LIMITS).automatic is None
    bounce = parse_mail(raw("From: a@b.test"), LIMITS, envelope_from="")
    assert bounce.automatic is not None and "bounce" in bounce.automatic


def test_crlf_smuggled_in_encoded_words_is_flattened() -> None:
    parsed = parse_mail(raw("From: =?utf-8?q?Eve=0D=0ABcc:_x@y?= <eve@x.test>\n"
                            "Subject: =?utf-8?q?a=0D=0Ab=00c?="), LIMITS)
    assert "\n" not in parsed.subject and "\r" not in parsed.subject and "\x00" not in \
        parsed.subject
    assert parsed.sender == "eve@x.test"  # the address never comes from a decoded word
    assert "\n" not in (parsed.sender_name or "")
    named = parse_mail(raw("From: =?utf-8?q?Eve=0D=0AB?= <eve@x.test>"), LIMITS)
    assert (named.sender, named.sender_name) == ("eve@x.test", "Eve B")


def test_unknown_charset_and_broken_base64_do_not_crash() -> None:
    parsed = parse_mail(raw("From: a@b.test\nContent-Type: text/plain; charset=klingon\n"
                            "Content-Transfer-Encoding: base64", "!!!not base64***"), LIMITS)
    assert parsed.problem is None and isinstance(parsed.full_text, str)


def test_html_only_is_converted_and_sanitised() -> None:
    parsed = parse_mail(raw(
        "From: a@b.test\nContent-Type: text/html; charset=utf-8",
        "<div>Where is <i>my</i> order?<br>Thanks</div><script>x()</script>"
        "<style>.a{}</style><a href=\"javascript:alert(1)\" onclick=\"y()\">link</a>"), LIMITS)
    assert parsed.text == "Where is my order?\nThanks\nlink"
    assert parsed.html is not None
    for bad in ("<script", "javascript:", "onclick", "<style"):
        assert bad not in parsed.html


def test_attachments_become_files_with_their_bytes_and_part_numbers() -> None:
    message = EmailMessage()
    message["From"] = "a@b.test"
    message.set_content("see attached")
    message.add_attachment(b"x" * 1234, maintype="image", subtype="png", filename="../../a.png")
    message.add_attachment(b"y" * 10, maintype="application", subtype="octet-stream",
                           filename="Grüße.bin")  # RFC 2231-encoded by the stdlib
    message.add_attachment(b"", maintype="text", subtype="plain", filename="empty.txt")
    parsed = parse_mail(message.as_bytes(), LIMITS)
    assert [(f.key, f.name, f.content_type, f.size, f.data) for f in parsed.files] == [
        ("2", "../../a.png", "image/png", 1234, b"x" * 1234),  # the store keeps "a.png"
        ("3", "Grüße.bin", "application/octet-stream", 10, b"y" * 10),
        ("4", "empty.txt", "text/plain", 0, b"")]
    assert parsed.text == "see attached"


def test_encoded_word_file_names_and_inline_images_are_decoded() -> None:
    raw = (b"From: a@b.test\r\nContent-Type: multipart/related; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/html\r\n\r\n<p>see <img src=cid:i1></p>\r\n"
           b"--b\r\nContent-Type: image/gif\r\nContent-ID: <i1>\r\n"
           b"Content-Disposition: inline\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"R0lGODlhAQABAAAAACw=\r\n"
           b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment;"
           b' filename="=?UTF-8?B?UmVjaG51bmcgw6QucGRm?="\r\n\r\n%PDF-1.4\r\n--b--\r\n')
    parsed = parse_mail(raw, LIMITS)
    assert [(f.key, f.name, f.content_type) for f in parsed.files] == [
        ("2", None, "image/gif"), ("3", "Rechnung ä.pdf", "application/pdf")]
    assert parsed.files[0].data == b"GIF89a\x01\x00\x01\x00\x00\x00\x00,"


def test_too_many_attachments_is_a_problem() -> None:
    message = EmailMessage()
    message["From"] = "a@b.test"
    message.set_content("many")
    for n in range(5):
        message.add_attachment(b"x", maintype="image", subtype="png", filename=f"{n}.png")
    parsed = parse_mail(message.as_bytes(), Limits(max_attachments=3))
    assert len(parsed.files) == 3 and parsed.problem is not None


def _nested(depth: int) -> bytes:
    body = "Content-Type: text/plain\r\n\r\nhi\r\n"
    for level in range(depth):
        body = (f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n'
                f"--b{level}\r\n{body}\r\n--b{level}--\r\n")
    return b"From: a@b.test\r\n" + body.encode()


@pytest.mark.parametrize("depth", [9, 50, 3000])
def test_deep_nesting_is_a_bomb_not_a_crash(depth: int) -> None:
    parsed = parse_mail(_nested(depth), LIMITS)
    assert parsed.problem is not None
    assert "nesting" in parsed.problem or "parts" in parsed.problem
    assert parsed.text is None and parsed.sender == "a@b.test"


def test_nesting_within_the_limit_is_read() -> None:
    parsed = parse_mail(_nested(8), LIMITS)
    assert parsed.problem is None and parsed.text == "hi"


def test_many_parts_and_size_are_bombs() -> None:
    many = b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n" + (
        b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n" * 5000) + b"--x--\r\n"
    assert "parts" in (parse_mail(many, LIMITS).problem or "")
    big = parse_mail(raw("From: a@b.test\nMessage-ID: <big@x>", "x" * 2000),
                     Limits(max_bytes=1000))
    assert "over the 1000 byte limit" in (big.problem or "") and big.external_id == "<big@x>"
    declared = parse_mail(raw("From: a@b.test"), LIMITS, size=LIMITS.max_bytes + 1)
    assert declared.problem is not None


# ------------------------------------------------------------------ text


@pytest.mark.parametrize(("body", "expected"), [
    ("Yes please.\n\nOn Mon, 1 Jan 2024 at 10:00, Support <s@x.test> wrote:\n> old\n> older",
     "Yes please."),
    ("Yes.\n\nOn Mon, 1 Jan 2024 at 10:00, Support Team <support@omnigate.test>\nwrote:\n> old",
     "Yes."),
    ("Ja.\n\nAm 01.01.2024 um 10:00 schrieb Support <s@x.test>:\n> alt", "Ja."),
    ("Oui.\n\nLe lun. 1 janv. 2024 à 10:00, Support <s@x.test> a écrit :\n> vieux", "Oui."),
    ("Sure.\n\n-----Original Message-----\nFrom: Support\nSent: Monday\nSubject: x", "Sure."),
    ("OK\n\n________________________________\nFrom: Support <s@x.test>\nSent: Monday", "OK"),
    ("Thanks!\n\nFrom: Support <s@x.test>\nSent: Monday, 1 January\nTo: me\nSubject: Re: x",
     "Thanks!"),
    ("Fine.\n-- \nJane Doe\nACME", "Fine."),
    ("Fine.\n\nSent from my iPhone", "Fine."),
    ("> question one?\nanswer one\n> question two?\nanswer two", "answer one\nanswer two"),
    ("From: here I start my story.\nIt was long.", "From: here I start my story.\nIt was long."),
    ("no quotes at all", "no quotes at all"),
])
def test_strip_reply(body: str, expected: str) -> None:
    assert strip_reply(body) == expected


def test_html_to_text_and_sanitize() -> None:
    assert html_to_text("<p>a</p><p>b<br>c</p><ul><li>x</li><li>y</li></ul>") == \
        "a\n\nb\nc\n\n- x\n- y"
    assert html_to_text("<table><tr><td>a</td><td>b</td></tr></table>") == "a b"
    assert html_to_text("<p>unclosed <b>tags <i>everywhere") == "unclosed tags everywhere"
    assert html_to_text("<!-- c --><head><title>t</title></head>body") == "body"
    assert sanitize_html('<img src="x" onerror="y()"><b>ok</b>') == '<img src="x"><b>ok</b>'


# ------------------------------------------------------------------ threads and choices


def test_token_is_stable_and_short() -> None:
    assert token_for("<a@b>") == token_for("<a@b>") != token_for("<a@c>")
    assert len(token_for("<a@b>")) == 12


@pytest.mark.parametrize(("text", "value"), [
    ("1", "faq:hours"), ("2.", "faq:shipping"), ("(3)", "handoff"), ("3)", "handoff"),
    ("  shipping COSTS  ", "faq:shipping"), ("Opening hours!", "faq:hours"),
    ("2\n\nthanks a lot", "faq:shipping"), ("4", None), ("0", None),
    ("I want 2 things", None), ("", None), (None, None),
])
def test_choice_by_number_or_label(text: str | None, value: str | None) -> None:
    assert choice(text, BUTTONS) == value


def test_no_buttons_no_choice() -> None:
    assert choice("1", []) is None


# ------------------------------------------------------------------ rendering


def outgoing(**changes: object) -> Outgoing:
    fields: dict[str, object] = {
        "from_address": "support@omnigate.test", "from_name": "Bot",
        "to_address": "a@b.test", "to_name": "Jane", "subject": "Re: x [#abcdefghijkm]",
        "message_id": "<1@omnigate.test>", "in_reply_to": "<p@b.test>",
        "references": ["<r@b.test>", "<p@b.test>"], "text": "Hello <you>",
        "buttons": BUTTONS, "automatic": True,
    }
    fields.update(changes)
    return Outgoing(**fields)  # type: ignore[arg-type]


def test_rendered_bot_mail() -> None:
    message = build(outgoing())
    again = BytesParser(policy=policy.default).parsebytes(message.as_bytes())
    assert again["Auto-Submitted"] == "auto-replied"
    assert again["In-Reply-To"] == "<p@b.test>"
    assert again["References"] == "<r@b.test> <p@b.test>"
    assert again["Message-ID"] == "<1@omnigate.test>"
    plain = again.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = again.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Hello <you>\n\n1. Opening hours\n2. Shipping costs\n3. Talk to a human" in plain
    assert "Hello &lt;you&gt;" in html and "<li>Shipping costs</li>" in html


def test_files_are_attached_with_their_names_and_types() -> None:
    files = [OutgoingFile("Grüße.pdf", "application/pdf", b"%PDF-1.4\x00\xff"),
             OutgoingFile("odd.bin", "not a type", b"\x00\x01"),
             OutgoingFile("mail.eml", "message/rfc822", b"From: a@b.test\r\n\r\nhi\r\n")]
    message = build(outgoing(buttons=[], files=files))
    again = BytesParser(policy=policy.default).parsebytes(message.as_bytes())
    assert again.get_content_type() == "multipart/mixed"
    assert again.get_body(("plain",)).get_content().strip() == "Hello <you>"  # type: ignore[union-attr]
    found = [(p.get_filename(), p.get_content_type()) for p in again.iter_attachments()]
    assert found == [("Grüße.pdf", "application/pdf"), ("odd.bin", "application/octet-stream"),
                     ("mail.eml", "application/octet-stream")]  # no base64 message/*
    first = next(again.iter_attachments())
    assert first.get_content() == b"%PDF-1.4\x00\xff"
    with pytest.raises(HeaderInjection):
        build(outgoing(files=[OutgoingFile("a\r\nBcc: x@y.test", "text/plain", b"x")]))


def test_choices_without_text_start_the_body() -> None:
    message = build(outgoing(text=""))
    plain = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert plain.startswith("1. Opening hours\n")


def test_human_mail_has_no_auto_submitted() -> None:
    assert build(outgoing(automatic=False, buttons=[]))["Auto-Submitted"] is None


@pytest.mark.parametrize("field", ["subject", "from_name", "to_name", "to_address",
                                   "message_id", "in_reply_to"])
@pytest.mark.parametrize("bad", ["a\r\nBcc: x@y.test", "a\nb", "a\rb", "a\x00b"])
def test_header_values_with_line_breaks_are_refused(field: str, bad: str) -> None:
    with pytest.raises(HeaderInjection):
        build(outgoing(**{field: bad}))


def test_references_are_trimmed_and_subjects_do_not_pile_up() -> None:
    refs = [f"<{n}@x>" for n in range(100)]
    header = build(outgoing(references=refs))["References"]
    ids = str(header).split()
    assert len(ids) == 20 and ids[0] == "<0@x>" and ids[-1] == "<99@x>"
    assert reply_subject("Re: RE: Fwd: Order [#abcdefghijkm]", "abcdefghijkm") == \
        "Re: Order [#abcdefghijkm]"
    assert reply_subject("", "abcdefghijkm") == "Re: Your message [#abcdefghijkm]"


# ------------------------------------------------------------------ fuzzing


def _normalised(parsed: ParsedMail) -> None:
    """What ``take_in`` does next must not fail either: the message model validates."""
    thread = Thread(token_for(parsed.external_id), False, "new", BUTTONS)
    message = inbound_message(parsed, thread, "fuzz", parsed.raw_size)
    assert message.external_id and message.sender_external_id
    for value in (parsed.subject, parsed.sender_name or ""):
        assert "\n" not in value and "\r" not in value


def _check(data: bytes) -> None:
    try:
        parsed = parse_mail(data, Limits(max_bytes=64 * 1024, max_parts=20, max_depth=4))
    except Rejected:
        return
    _normalised(parsed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check(data)


HEADER_NAMES = st.sampled_from([
    "From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References", "Date",
    "Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "Auto-Submitted",
    "Precedence", "Return-Path", "Sender", "Reply-To", "MIME-Version", "X-Weird"])
HEADER_VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from([
        "a@b.test", "<a@b.test>", '"x" <a@b.test>', "=?utf-8?q?=0D=0A?=", "=?bogus?x?y?=",
        "multipart/mixed; boundary=b", 'multipart/alternative; boundary="b"', "text/html",
        "text/plain; charset=unknown-8bit", "base64", "quoted-printable", "attachment",
        "<x@y> <z@w>", "auto-replied", "bulk", "<>", "Mon, 99 Foo 9999 99:99:99 +9999"]),
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=12))
    lines = [f"{name}: {value}" for name, value in headers]
    body = draw(st.one_of(
        st.text(max_size=300),
        st.lists(st.sampled_from(["--b", "--b--", "Content-Type: text/plain", "",
                                  "Content-Type: multipart/mixed; boundary=b", "hello",
                                  "> quoted", "-- ", "<p>x</p>", "=E2=82", "SGVsbG8="]),
                 max_size=40).map("\r\n".join),
    ))
    text = "\r\n".join(lines) + "\r\n\r\n" + body
    return text.encode("utf-8", "surrogateescape")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example(data=b"From: \xc2\x80@0\r\n\r\n")  # raw 8-bit bytes in an address (was a crash)
@example(data=b"From: jos\xc3\xa9@example.com\r\n\r\nhi")  # UTF-8 address (RFC 6532)
def test_fuzz_structured_messages(data: bytes) -> None:
    _check(data)
