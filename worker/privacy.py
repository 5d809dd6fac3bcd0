"""Shopify's mandatory privacy topics, and the relay's own copies of a customer.

- ``customers/redact``: the profiles that match the customer (by each
  ``privacy.match`` field, by default email and Shopify customer id) get the
  configured action: their personal fields cleared (the default) or the
  profile deleted. The relay's own stored deliveries of that customer, queued,
  scheduled, failed or finished, are deleted too.
- ``shop/redact``: the relay's stored deliveries of that shop are deleted.
  The shop's data in Copernica is the merchant's own; the relay leaves it.
- ``customers/data_request``: acknowledged and logged. The relay keeps no
  customer data beyond deliveries in transit; the data lives in Copernica.

Nothing here logs a name, an email or a phone number: only counts and ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from rq import Queue
from rq.job import Job
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
)

PRIVACY_TOPICS = ("customers/redact", "shop/redact", "customers/data_request")

#: Jobs fetched from Redis at a time while looking for a customer's copies.
SCAN_BATCH = 200


def stored_job_ids(queue: Queue) -> list[str]:
    """Every delivery job Redis holds for this queue, except those running."""
    ids = list(queue.get_job_ids())
    for registry_class in (
        ScheduledJobRegistry,
        FailedJobRegistry,
        FinishedJobRegistry,
        DeferredJobRegistry,
    ):
        ids.extend(registry_class(queue=queue).get_job_ids())
    return list(dict.fromkeys(ids))


def erase_copies(
    queue: Queue,
    shop: str | None,
    needles: Iterable[str] | None = None,
    keep: str | None = None,
) -> int:
    """Delete stored deliveries of ``shop`` whose bodies hold one of ``needles``.

    ``needles=None`` means every delivery of the shop (shop/redact). Needles
    are matched in the body's JSON text: an email in any letter case, with or
    without surrounding spaces, as a string; a customer id as a number or a
    string. ``keep`` is the job doing the erasing. Without a shop, or with an
    empty list of needles, nothing is erased: a request that names nobody
    must not wipe other customers' pending events.
    """
    if not shop:
        return 0
    patterns = None if needles is None else _patterns(needles)
    if patterns is not None and not patterns:
        return 0
    erased = 0
    ids = [job_id for job_id in stored_job_ids(queue) if job_id != keep]
    for start in range(0, len(ids), SCAN_BATCH):
        batch = Job.fetch_many(
            ids[start : start + SCAN_BATCH],
            connection=queue.connection,
            serializer=queue.serializer,
        )
        for job in batch:
            if job is None or not job.args or not isinstance(job.args[0], dict):
                continue
            record = job.args[0]
            if record.get("source") != "shopify":
                continue
            if record.get("account") != shop:
                continue
            if patterns is not None and not _mentions(record.get("body"), patterns):
                continue
            job.delete()
            erased += 1
    return erased


def _patterns(needles: Iterable[str]) -> list[re.Pattern]:
    patterns = []
    for needle in needles:
        text = str(needle).strip().lower()
        if not text:
            continue
        # As a JSON string, spaces inside the quotes allowed; non-ASCII as is.
        quoted = json.dumps(text, ensure_ascii=False)[1:-1]
        patterns.append(re.compile(rf'"\s*{re.escape(quoted)}\s*"'))
        if text.isdigit():
            patterns.append(re.compile(rf"[:\[,]\s*{text}\s*[,}}\]]"))
    return patterns


def _mentions(body: Any, patterns: list[re.Pattern]) -> bool:
    text = json.dumps(body, ensure_ascii=False).lower()
    return any(pattern.search(text) for pattern in patterns)
