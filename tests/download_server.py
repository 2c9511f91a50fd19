"""A real HTTP server on 127.0.0.1 that serves files the ways the authors' hosts do, for download tests.

``/direct/<name>``: a direct link (Aliyun OSS): Content-Length, byte ranges (206), and, when
``truncate_next`` is set, a connection closed half-way through the body once.
``/uc?export=download&id=<id>``: Google Drive's entry point: an HTML page "can't scan this file
for viruses" with a form of hidden fields (``id``, ``export``, ``confirm``, ``uuid``) whose action
is ``/download``; ``/download`` with those fields sends the file with a Content-Disposition name,
and the page again without them. ``/quota?id=<id>``: Drive's "too many users" page, never the file.
"""

from __future__ import annotations

import re
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from hub_server import LocalServer

CONFIRM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="{id}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="{uuid}">
</form></body></html>"""

QUOTA_PAGE = """<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users have viewed or
downloaded this file recently.</body></html>"""


class DownloadServer(LocalServer):
    """``files`` maps a name (direct links) or a Drive id to bytes; ``requests`` logs
    ``(path, Range header or None)`` of every GET."""

    uuid = "0f6a1c2e-uuid"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.truncate_next = False
        self.direct_name: str | None = None  # a Content-Disposition file name for direct links
        super().__init__(_handler)

    def file_requests(self) -> list[tuple[str, str | None]]:
        """GETs that were answered with file bytes (not pages)."""
        return [(path, byte_range) for path, byte_range in self.requests if path.startswith(("/direct/", "/download?"))]


def _handler(server: DownloadServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _page(self, text: str) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", "download_warning_13058876669334088843_x=t; Path=/")
            self.end_headers()
            self.wfile.write(body)

        def _file(self, data: bytes, filename: str | None = None) -> None:
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and int(match.group(1)) < len(data):
                start, status = int(match.group(1)), 206
            elif match:
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if filename:
                self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
            self.end_headers()
            if server.truncate_next:
                server.truncate_next = False
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self) -> None:
            server.requests.append((self.path, self.headers.get("Range")))
            parts = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            if parts.path.startswith("/direct/") and parts.path[len("/direct/"):] in server.files:
                return self._file(server.files[parts.path[len("/direct/"):]], filename=server.direct_name)
            if parts.path == "/uc" and query.get("id") in server.files:
                return self._page(CONFIRM_PAGE.format(action=f"{server.url}/download", id=query["id"], uuid=server.uuid))
            if parts.path == "/download" and query.get("id") in server.files:
                if query.get("confirm") == "t" and query.get("uuid") == server.uuid:
                    return self._file(server.files[query["id"]], filename=f"atstframe_{query['id'][:4]}.ckpt")
                return self._page(CONFIRM_PAGE.format(action=f"{server.url}/download", id=query["id"], uuid=server.uuid))
            if parts.path == "/quota":
                return self._page(QUOTA_PAGE)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
