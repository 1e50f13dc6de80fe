"""Retry-After through the real Envoy in every form RFC 9110 §5.6.7 makes a recipient accept: delay-seconds'
sibling, the HTTP-date, as IMF-fixdate, RFC 850 and asctime. A date the filter cannot read (a day its month does
not have, bytes that are not UTF-8) falls back to the retry schedule, and never traps the VM.

One Envoy, one job completion, one webhook per form on one scripted receiver: each answers its first attempt
503 with its own Retry-After, about 3 s ahead, then 200.
"""

import time
from email.utils import formatdate

from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.faults import Reply
from harness.observe import Counters, complete_job, plugin_log_lines, wait_for_log

# The schedule alone retries after 160-240 ms (200 ms ±20%).
SCHEDULE = ["200ms", "200ms"]
AHEAD = 3  # seconds


def imf_fixdate(at: float) -> str:
    return formatdate(at, usegmt=True)  # Sun, 06 Nov 1994 08:49:37 GMT


def rfc850(at: float) -> str:
    return time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(at))  # Sunday, 06-Nov-94 08:49:37 GMT


def asctime(at: float) -> str:
    return time.asctime(time.gmtime(at))  # Sun Nov  6 08:49:37 1994


def no_such_day(at: float) -> str:
    # A well-formed IMF-fixdate whose day the month does not have (30 days hath November); a lax parser would
    # read it as 1 December.
    return f"Tue, 31 Nov {time.gmtime(at).tm_year + 1} 08:49:37 GMT"


def not_utf8(at: float) -> str:
    # http.server writes header values as Latin-1, so this goes out as the byte 0xFF: not UTF-8.
    return imf_fixdate(at)[:-3] + "G\xffT"


READABLE = {"imf-fixdate": imf_fixdate, "rfc850": rfc850, "asctime": asctime}
UNREADABLE = {"no-such-day": no_such_day, "not-utf8": not_utf8}


def test_every_http_date_form_is_honoured_and_unreadable_dates_fall_back_to_the_schedule(rc, start_envoy):
    org = new_id()
    hooks = {name: make_hook(rc.port, org, ["job.completed"], name=f"retry-after-{name}")
             for name in {**READABLE, **UNREADABLE}}
    sent = {}
    for name, form in {**READABLE, **UNREADABLE}.items():
        def answer(_d, _n, form=form, name=name):
            value = form(time.time() + AHEAD)
            sent[name] = value
            return Reply(503, headers=(("Retry-After", value),))
        rc.script(hooks[name].path, [answer])  # then 200

    envoy = start_envoy(PluginConfig(hooks=list(hooks.values()),
                                     delivery=delivery_section(retrySchedule=SCHEDULE)))
    counters = Counters(envoy)
    complete_job(envoy, org)
    counters.wait_delta("deliveries_succeeded", len(hooks), timeout=30)

    for name, hook in hooks.items():
        first, second = rc.requests_to(hook.path)[:2]
        (line,) = wait_for_log(envoy, rf"attempt failed, will retry: event={first.event_id} webhook={hook.id} "
                                      rf"attempts=1 last=status 503 retry_in_ms=(\d+)")
        waited = int(line.group(1))
        gap = second.received_at - first.received_at
        if name in READABLE:
            # The date has whole seconds: 2 to 3 s ahead when sent, less the answer's way back to the filter.
            assert 1000 <= waited <= AHEAD * 1000, f"{name} {sent[name]!r}: the filter waited {waited} ms"
            assert gap >= waited / 1000, f"{name}: retried {gap:.3f}s after the 503, having said {waited} ms"
        else:
            assert waited <= 240, f"{name} {sent[name]!r} was read as a date: the filter waited {waited} ms"
        wait_for_log(envoy, rf"delivered: event={first.event_id} webhook={hook.id} attempts=2 ")
        assert [d.answer for d in rc.requests_to(hook.path)] == [503, 200]

    assert counters.deltas("deliveries_failed", "deliveries_retried", "deliveries_succeeded") == \
        {"deliveries_failed": len(hooks), "deliveries_retried": len(hooks), "deliveries_succeeded": len(hooks)}
    # A header that is not UTF-8 is read as bytes: nothing panicked, no VM was reloaded.
    log = envoy.log_text()
    assert "panicked" not in log and not plugin_log_lines(envoy, "panicked"), "the filter panicked"
