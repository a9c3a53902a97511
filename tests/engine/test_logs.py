"""Log lines: JSON, with every URL cut to scheme://host/path, since user info and query strings carry secrets."""

from __future__ import annotations

import json
import logging

from engine.common.logs import JsonFormatter, redact_urls


def test_log_lines_cut_every_url_to_scheme_host_and_path():
    record = logging.LogRecord(
        "engine.x", logging.WARNING, __file__, 1, "fetching %s", ("https://u:PW@h:8/p?q=TOKEN",), None
    )
    record.fields = {"url": "http://h/a#FRAG", "count": 3}
    try:
        raise ValueError("proxy http://name:PW@proxy:3128 refused")
    except ValueError as error:
        record.exc_info = (type(error), error, error.__traceback__)
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["message"] == "fetching https://h:8/p"
    assert entry["url"] == "http://h/a" and entry["count"] == 3
    assert "proxy http://proxy:3128 refused" in entry["exception"]
    assert "PW" not in line and "TOKEN" not in line and "FRAG" not in line


def test_a_password_holding_a_slash_or_a_question_mark_is_cut_too():
    assert redact_urls("proxies {'http': 'http://u:pa/ss@h:1', 'https': 'http://u:p?w@h:2/x'}") == (
        "proxies {'http': 'http://h:1', 'https': 'http://h:2/x'}"
    )
    assert redact_urls("no URL here: a@b, 12:30") == "no URL here: a@b, 12:30"


def test_a_request_line_loses_its_query():
    line = 'http://h:80 "GET /x.png?token=SECRET&a=1 HTTP/1.1" 200 5'
    assert redact_urls(line) == 'http://h:80 "GET /x.png HTTP/1.1" 200 5'
