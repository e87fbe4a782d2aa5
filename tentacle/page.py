"""
The page a browser or C{curl -k} gets from the agent's port: proof that the
agent is up and speaking TLS, for troubleshooting, and nothing more.
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;"
    "padding:0 1em;color:#1f2d3d}h1{font-size:1.5em}"
)

_BODY = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Tentacle</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Tentacle configured successfully</h1>
<p>If you can view this page, this Tentacle deployment agent is configured and ready to accept deployment commands.</p>
<p>This page is shown to clients that present no trusted certificate. Only servers with a trusted certificate can control this agent.</p>
</body>
</html>
"""

_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode("utf-8")).digest()).decode()

#: The headers Octopus Tentacle sends with its page, so scanners see the same.
HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'self'"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("X-XSS-Protection", "1; mode=block"),
    ("Strict-Transport-Security", "max-age=31536000"),
)


def render(body: str = _BODY, headers: tuple[tuple[str, str], ...] = HEADERS) -> bytes:
    """
    A complete HTTP/1.0 response; the length is counted in bytes of UTF-8,
    which is what HTTP means (Halibut counts characters, wrong for non-ASCII).
    """
    content = body.encode("utf-8")
    lines = [
        "HTTP/1.0 200 OK",
        "Content-Type: text/html; charset=utf-8",
        f"Content-Length: {len(content)}",
        *(f"{name}: {value}" for name, value in headers),
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + content


FRIENDLY_PAGE = render()
