"""The stored body_html runs nothing in the HR app's page: well over 60 XSS vectors through the sanitizer
(inboxd.html.sanitize_html, what parse_message stores as body_html), then through a real mailbox and a sync.

Each output is read back with html.parser and must hold no tag outside what docs/schema.md keeps (formatting,
headings, lists, tables, blockquote, pre, a, img) and none of a denylist, no on* handler, no style/class/id, no
comment, and no URL attribute but a/href (http, https, mailto) and img/src (http, https, cid), scheme read the way
a browser reads it (entities decoded, tabs and newlines removed, leading controls and spaces stripped).
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.policy import SMTP
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness import MailStack
from harness.config import write_stack_config
from inboxd.clock import SystemClock
from inboxd.config import load_config
from inboxd.html import sanitize_html
from inboxd.models import MailMessage
from inboxd.parse import parse_message
from inboxd.runner import Runner
from inboxd.store import Credential, Store

messages_t = MailMessage.__table__  # type: ignore[attr-defined]

VECTORS = {
    # script elements, many spellings
    "script": "<script>alert(1)</script>",
    "script upper": "<SCRIPT>alert(1)</SCRIPT>",
    "script mixed case src": "<ScRiPt src=//evil.example/x.js></ScRiPt>",
    "script slash src": '<script/src="http://evil.example/x.js"></script>',
    "script form feed": "<script\x0c>alert(1)</script>",
    "script double open": "<<script>alert(1)//<</script>",
    "script split by script": "<scr<script>ipt>alert(1)</scr</script>ipt>",
    "script unclosed": "<p>text<script>alert(1)",
    "script after end tag": "</script><script>alert(1)</script>",
    "script cdata body": '<script type="text/javascript">/*<![CDATA[*/alert(1)/*]]>*/</script>',
    # event handlers on common tags
    "img onerror": "<img src=x onerror=alert(1)>",
    "img onerror mixed case": "<img src=x OnErRoR=alert(1)>",
    "img onerror spaced": '<img src=x onerror  =  "alert(1)">',
    "img slashes": "<img/src=x/onerror=alert(1)>",
    "body onload": "<body onload=alert(1)>x</body>",
    "svg onload": "<svg onload=alert(1)>",
    "div onmouseover": '<div onmouseover="alert(1)">x</div>',
    "a onclick": '<a href="https://ok.example/" onclick="alert(1)">x</a>',
    "p onclick": "<p onclick=alert(1)>x</p>",
    "table and td handlers": "<table onmouseover=alert(1)><tr><td onclick=alert(1)>x</td></tr></table>",
    "input autofocus onfocus": "<input autofocus onfocus=alert(1)>",
    "details ontoggle": "<details open ontoggle=alert(1)>x</details>",
    "video source onerror": "<video><source onerror=alert(1)></video>",
    "audio onerror": "<audio src=x onerror=alert(1)>",
    "marquee onstart": "<marquee onstart=alert(1)>x</marquee>",
    "b font span handlers": "<b onmouseover=alert(1)>x</b><font onmouseover=alert(1)>y</font><span onpointerenter=alert(1)>z</span>",  # noqa: E501
    "select textarea keygen autofocus": "<select onfocus=alert(1) autofocus></select><textarea onfocus=alert(1) autofocus></textarea><keygen autofocus onfocus=alert(1)>",  # noqa: E501
    "isindex": "<isindex type=image src=1 onerror=alert(1)>",
    # script URLs
    "href javascript": '<a href="javascript:alert(1)">x</a>',
    "href javascript upper": '<a href="JAVASCRIPT:alert(1)">x</a>',
    "href entity tab": '<a href="jav&#x09;ascript:alert(1)">x</a>',
    "href decimal entities": '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)">x</a>',
    "href padded decimal entities": '<a href="&#0000106&#0000097&#0000118&#0000097&#0000115&#0000099&#0000114&#0000105&#0000112&#0000116&#0000058alert(1)">x</a>',  # noqa: E501
    "href hex entity": '<a href="&#x6A;avascript:alert(1)">x</a>',
    "href named newline entity": '<a href="java&NewLine;script:alert(1)">x</a>',
    "href colon entity": '<a href="javascript&colon;alert(1)">x</a>',
    "href literal tab": '<a href="jav\tascript:alert(1)">x</a>',
    "href leading spaces": '<a href="   javascript:alert(1)">x</a>',
    "href leading control": '<a href="\x01javascript:alert(1)">x</a>',
    "href NUL in scheme": '<a href="java\x00script:alert(1)">x</a>',
    "href vbscript": '<a href="vbscript:msgbox(1)">x</a>',
    "href data html": '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
    "href feed wrapper": '<a href="feed:javascript:alert(1)">x</a>',
    "href file": '<a href="file:///etc/passwd">x</a>',
    "href relative": '<a href="/admin/delete?all=1">x</a>',
    "href protocol relative": '<a href="//evil.example/">x</a>',
    "img src javascript": '<img src="javascript:alert(1)">',
    "img src data svg": '<img src="data:image/svg+xml,<svg onload=alert(1)>">',
    "img src scheme onerror eval": "<img src=x:alert(1) onerror=eval(src)>",
    "img srcset": '<img src="cid:logo@x" srcset="javascript:alert(1) 1x">',
    "img dynsrc lowsrc longdesc": '<img dynsrc="javascript:alert(1)" lowsrc="javascript:alert(1)" longdesc="javascript:alert(1)" src="https://ok.example/x.png">',  # noqa: E501
    "form action": '<form action="javascript:alert(1)"><input type=submit></form>',
    "button formaction": '<button formaction="javascript:alert(1)">x</button>',
    "form button formaction unclosed": "<form><button formaction=javascript:alert(1)>x",
    "button form attribute": '<form id=f></form><button form=f formaction="javascript:alert(1)">x</button>',
    "input image src": '<input type="image" src="javascript:alert(1)">',
    "svg xlink href": '<svg><a xlink:href="javascript:alert(1)"><text x="20" y="20">x</text></a></svg>',
    "table background": '<table background="javascript:alert(1)"><tr><td>x</td></tr></table>',
    "blockquote q del cite": '<blockquote cite="javascript:alert(1)">x</blockquote><q cite=javascript:alert(1)>y</q><del cite=javascript:alert(1)>z</del>',  # noqa: E501
    "area in map": '<img src="https://ok.example/x.png" usemap=#m><map name=m><area href=javascript:alert(1)></map>',
    "data attribute": '<div data-url="javascript:alert(1)" data-x="1">x</div>',
    # CSS
    "style expression": '<div style="width:expression(alert(1))">x</div>',
    "style url javascript": '<div style="background:url(javascript:alert(1))">x</div>',
    "style behavior": '<div style="behavior:url(x.htc)">x</div>',
    "style moz binding": '<p style="-moz-binding:url(http://evil.example/x.xml#xss)">x</p>',
    "style block import": "<style>@import 'http://evil.example/x.css';</style><p>x</p>",
    "style block url": '<style>body{background:url("javascript:alert(1)")}</style>',
    "link stylesheet": '<link rel=stylesheet href="http://evil.example/x.css">',
    # SVG
    "svg script": "<svg><script>alert(1)</script></svg>",
    "svg animate onbegin": "<svg><animate onbegin=alert(1) attributeName=x dur=1s></svg>",
    "svg set href": '<svg><a><set attributeName=href to="javascript:alert(1)"/><text>x</text></a></svg>',
    "svg animate values": '<svg><a><animate attributeName=href values="javascript:alert(1)"/><text>x</text></a></svg>',
    "svg foreignobject iframe": "<svg><foreignObject><iframe src=javascript:alert(1)></iframe></foreignObject></svg>",
    "svg use data": '<svg><use href="data:image/svg+xml,<svg id=x onload=alert(1)>#x"/></svg>',
    # MathML
    "math href": '<math href="javascript:alert(1)">x</math>',
    "math maction": '<math><maction actiontype="statusline" xlink:href="javascript:alert(1)">x</maction></math>',
    "math mglyph style": "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    # frames, plugins, base, meta
    "iframe src": '<iframe src="javascript:alert(1)"></iframe>',
    "iframe srcdoc": '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    "object data": '<object data="data:text/html,<script>alert(1)</script>"></object>',
    "object codebase": '<object classid="clsid:333C7BC4-460F-11D0-BC04-0080C7055A83" codebase="javascript:alert(1)"></object>',  # noqa: E501
    "embed src": '<embed src="javascript:alert(1)">',
    "embed data svg": '<embed src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
    "applet": "<applet code=X.class></applet>",
    "frameset onload": "<frameset onload=alert(1)><frame src=javascript:alert(1)></frameset>",
    "base href": '<base href="javascript:alert(1)//"><a href="x">x</a>',
    "meta refresh": '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    "meta charset utf-7": '<meta charset="utf-7">+ADw-script+AD4-alert(1)+ADw-/script+AD4-',
    # comments, CDATA, processing instructions
    "comment short close": "<!--><script>alert(1)</script>-->",
    "comment bang close": "<!-- --!><script>alert(1)</script> -->",
    "cdata": "<![CDATA[><script>alert(1)</script>]]>",
    "conditional comment": "<!--[if gte IE 4]><script>alert(1)</script><![endif]-->",
    "processing instruction": "<? ><script>alert(1)</script> ?>",
    "comment in attribute": '<!DOCTYPE html><!--<img src="--><img src=x onerror=alert(1)//">',
    # nested and unclosed
    "img unclosed at end": "<div><img src=x onerror=alert(1)",
    "a unclosed quote": '<a href="javascript:alert(1)"',
    "double angle": "<<img src=x onerror=alert(1)//>>",
    "attribute glued to tag": '<img src="x" onerror="alert(1)"<p>',
    # mutation XSS (content a second parse reads differently)
    "noscript title": '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    "svg style id": '<svg></p><style><a id="</style><img src=1 onerror=alert(1)>">',
    "math style comment": '<math><mtext><table><mglyph><style><!--</style><img title="--&gt;&lt;/mglyph&gt;&lt;img&Tab;src=1&Tab;onerror=alert(1)&gt;">',  # noqa: E501
    "form math": "<form><math><mtext></form><form><mglyph><style></math><img src onerror=alert(1)>",
    "listing": "<listing>&lt;img src=x onerror=alert(1)&gt;</listing>",
    "textarea": "<textarea><img src=x onerror=alert(1)></textarea>",
    "xmp": "<xmp><img src=x onerror=alert(1)></xmp>",
    "title": "<title><img src=x onerror=alert(1)></title>",
    "noembed": "<noembed><img src=x onerror=alert(1)></noembed>",
    "template": "<template><img src=x onerror=alert(1)></template>",
    "plaintext": "<plaintext><img src=x onerror=alert(1)>",
    "iframe content": "<iframe><img src=x onerror=alert(1)></iframe>",
    "style content": "<style><img src=x onerror=alert(1)></style>",
    "escaped title attribute": '<a href="https://ok.example/" title="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;">x</a>',  # noqa: E501
}

# what docs/schema.md keeps: basic formatting, headings, lists, tables, blockquote, pre, a href and img src
ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code", "col",
        "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6",
        "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "samp", "small", "span",
        "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u",
        "ul", "var", "wbr",
    }
)  # fmt: skip
DENIED_TAGS = frozenset(
    {
        "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "param", "form", "input",
        "button", "select", "option", "textarea", "keygen", "isindex", "svg", "math", "animate", "set", "use",
        "foreignobject", "maction", "base", "meta", "link", "area", "map", "template", "noscript", "xmp",
        "plaintext", "listing", "noembed", "noframes", "title", "video", "audio", "source", "track", "marquee",
        "bgsound", "body", "html", "head", "details",
    }
)  # fmt: skip
DENIED_ATTRIBUTES = frozenset(
    {
        "style", "class", "id", "srcset", "srcdoc", "action", "formaction", "xlink:href", "background",
        "dynsrc", "lowsrc", "longdesc", "cite", "data", "codebase", "classid", "poster", "usemap", "form",
        "http-equiv", "content",
    }
)  # fmt: skip
URL_SCHEMES = {("a", "href"): {"http", "https", "mailto"}, ("img", "src"): {"http", "https", "cid"}}
_SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")


class _Elements(HTMLParser):
    """Every start tag with its attributes (values entity-decoded), and every comment or declaration left."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.markup: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, attrs))

    def handle_comment(self, data: str) -> None:
        self.markup.append(f"comment {data!r}")

    def handle_decl(self, decl: str) -> None:
        self.markup.append(f"declaration {decl!r}")

    def handle_pi(self, data: str) -> None:
        self.markup.append(f"processing instruction {data!r}")

    def unknown_decl(self, data: str) -> None:
        self.markup.append(f"declaration {data!r}")


def url_scheme(value: str) -> str | None:
    """The scheme a browser would use for ``value`` (WHATWG URL: leading/trailing C0 controls and spaces stripped,
    tabs and newlines removed anywhere); None for a relative URL."""
    cleaned = re.sub(r"[\t\n\r]", "", value).strip("".join(chr(c) for c in range(0x21))).lower()
    match = _SCHEME.match(cleaned)
    return match.group(1) if match else None


def execution_vectors(html: str) -> list[str]:
    """Everything in sanitized ``html`` that could run script, load a document or restyle the page."""
    parser = _Elements()
    parser.feed(html)
    parser.close()
    found = list(parser.markup)
    for tag, attrs in parser.elements:
        if tag in DENIED_TAGS or tag not in ALLOWED_TAGS:
            found.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on") or name in DENIED_ATTRIBUTES:
                found.append(f"<{tag} {name}>")
            elif name in ("href", "src"):
                allowed = URL_SCHEMES.get((tag, name))
                scheme = url_scheme(value or "")
                if allowed is None or scheme not in allowed:
                    found.append(f"<{tag} {name}={value!r}> (scheme {scheme})")
    if re.search(r"<\s*script", html, re.IGNORECASE):
        found.append("'<script' in the markup")
    return found


def test_there_are_more_than_sixty_vectors() -> None:
    assert len(VECTORS) > 60


@pytest.mark.parametrize("payload", VECTORS.values(), ids=VECTORS.keys())
def test_sanitized_vector_has_no_execution_vector(payload: str) -> None:
    cleaned = sanitize_html(payload)
    assert execution_vectors(cleaned) == [], cleaned
    assert sanitize_html(cleaned) == cleaned, "a second pass changes the output: a parser differential"


@pytest.mark.parametrize("payload", VECTORS.values(), ids=VECTORS.keys())
def test_vector_in_a_mail_body_is_stored_clean(payload: str) -> None:
    """The same vector as the text/html part of a message, through parse_message (what the sync stores)."""
    raw = b"From: a@example.org\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + payload.encode()
    parsed = parse_message(raw)
    assert parsed.body_html is not None
    assert execution_vectors(parsed.body_html) == [], parsed.body_html


def test_the_checker_catches_what_it_is_meant_to() -> None:
    """execution_vectors is the oracle of this module: it must flag each kind of leak on unsanitized markup."""
    leaks = {
        "<script>x</script>": "<script>",
        '<img src="x.png" onerror="y">': "onerror",
        '<a href="jav&#x09;ascript:alert(1)">x</a>': "scheme javascript",
        '<a href=" \x01javascript:x">x</a>': "scheme javascript",
        '<a href="/relative">x</a>': "scheme None",
        '<img src="data:image/png;base64,AA">': "scheme data",
        '<a href="cid:x@y">x</a>': "scheme cid",
        '<p style="color:red">x</p>': "style",
        "<!-- x -->": "comment",
        "<svg></svg>": "<svg>",
        "<marquee>x</marquee>": "<marquee>",
    }
    for markup, expected in leaks.items():
        assert any(expected in found for found in execution_vectors(markup)), markup
    safe = '<p><a href="https://x.example/" rel="noopener">a</a><img src="cid:logo@x"><a href="mailto:a@b">m</a></p>'
    assert execution_vectors(safe) == []


def test_safe_mail_html_survives() -> None:
    """The sanitizer is not simply dropping everything: links, inline images and formatting stay."""
    cleaned = sanitize_html(
        '<p>Dear <b>recruiter</b>, see <a href="https://cv.example/ana">my CV</a> '
        '<img src="cid:photo@x" alt="me"> or <a href="mailto:ana@example.org">mail me</a>.</p>'
    )
    assert '<a href="https://cv.example/ana" rel="noopener noreferrer nofollow">my CV</a>' in cleaned
    assert '<img src="cid:photo@x" alt="me">' in cleaned
    assert '<a href="mailto:ana@example.org" rel="noopener noreferrer nofollow">' in cleaned


@pytest.mark.mailstack
def test_xss_mail_through_dovecot_is_stored_clean(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    """Three messages over SMTP into a real mailbox and one sync: every vector in one multipart/alternative
    message, a UTF-7 html part that decodes to <script>, and quoted-printable html hiding its tags as =3C: each
    stored body_html is clean (on SQLite and PostgreSQL)."""
    user = mailstack.new_user("xss")
    config = load_config(write_stack_config(tmp_path, db_url, mailstack), env={})
    store.add_account(user, "local", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    everything = EmailMessage(policy=SMTP)
    everything["From"], everything["To"], everything["Subject"] = "cand@example.org", user, "every vector"
    everything["Message-ID"] = "<xss-all@example.org>"
    everything.set_content("plain part")
    everything.add_alternative("<hr>".join(VECTORS.values()), subtype="html")
    utf7 = (
        b"From: cand@example.org\r\nTo: " + user.encode() + b"\r\nSubject: utf-7 html\r\n"
        b"Message-ID: <xss-utf7@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-7\r\n\r\n"
        b"+ADw-script+AD4-alert(1)+ADw-/script+AD4-+ADw-img src+AD0-x onerror+AD0-alert(1)+AD4-hello\r\n"
    )
    qp = (
        b"From: cand@example.org\r\nTo: " + user.encode() + b"\r\nSubject: qp html\r\n"
        b"Message-ID: <xss-qp@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b'=3Cscript=3Ealert(1)=3C/script=3E=3Ca href=3D"jav=09ascript:alert(1)"=3Ex=3C/a=3E=\r\n'
        b"=3Csvg onload=3Dalert(1)=3E\r\n"
    )
    for raw in (everything.as_bytes(), utf7, qp):
        mailstack.deliver(user, raw)
    [result] = Runner(config, store, clock=SystemClock()).sync_once(only=user)
    assert result.ok, result.reason
    with store.engine.connect() as conn:
        stored = {r.subject: r.body_html for r in conn.execute(sa.select(messages_t.c.subject, messages_t.c.body_html))}
    assert set(stored) == {"every vector", "utf-7 html", "qp html"}
    for subject, body_html in stored.items():
        assert body_html is not None, subject
        assert execution_vectors(body_html) == [], (subject, body_html)
    assert "hello" in stored["utf-7 html"]
