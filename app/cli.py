"""Operator commands: ``bin/relay <command>``, ``python -m app <command>`` or
``flask --app app <command>``."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click
import requests
from flask import Flask, current_app
from flask.cli import with_appcontext

from app import failed as failed_store
from app.signatures import TYPEFORM_PREFIX, sign

DEFAULT_URL = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"


def init_app(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)


@click.command("send")
@with_appcontext
@click.argument("source", type=click.Choice(["shopify", "typeform"]))
@click.argument("topic")
@click.argument(
    "body_file", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    help="Base URL of the running relay.",
)
@click.option(
    "--shop",
    default="example.myshopify.com",
    show_default=True,
    help="X-Shopify-Shop-Domain to send.",
)
@click.option(
    "--delivery-id",
    default=None,
    help="X-Shopify-Webhook-Id to send (Shopify; default: a new one).",
)
def send(source, topic, body_file, url, shop, delivery_id):
    """Sign BODY_FILE as SOURCE would and post it to a running relay.

    The file's bytes are sent exactly as they are, signed with the first
    secret configured for SOURCE. For Typeform the topic is read from the
    body's event_type, so TOPIC is only checked against it.
    """
    if source == "typeform" and delivery_id:
        raise click.UsageError(
            "Typeform delivery ids come from the body (form id, token, event "
            "type); change form_response.token in the file to send it anew"
        )
    settings = current_app.extensions["relay"]["settings"]
    secrets = settings.secrets_for(source)
    if not secrets:
        raise click.UsageError(f"set {source.upper()}_WEBHOOK_SECRET to sign with")

    body = body_file.read_bytes()
    signature = sign(secrets[0], body)
    headers = {"Content-Type": "application/json"}
    if source == "shopify":
        headers |= {
            "X-Shopify-Topic": topic,
            "X-Shopify-Hmac-Sha256": signature,
            "X-Shopify-Shop-Domain": shop,
            "X-Shopify-Webhook-Id": delivery_id or str(uuid.uuid4()),
            "X-Shopify-Triggered-At": datetime.now(UTC).isoformat(),
            "X-Shopify-API-Version": "2026-07",
        }
    else:
        headers["Typeform-Signature"] = TYPEFORM_PREFIX + signature
        _check_typeform_topic(body, topic)

    endpoint = f"{url.rstrip('/')}/webhooks/{source}"
    try:
        response = requests.post(
            endpoint, data=body, headers=headers, timeout=10, allow_redirects=False
        )
    except requests.RequestException as error:
        raise click.ClickException(f"could not reach {endpoint}: {error}") from None

    click.echo(f"{response.status_code} {response.text.strip()}")
    if response.status_code >= 300:
        raise SystemExit(1)


def _check_typeform_topic(body: bytes, topic: str) -> None:
    try:
        event_type = json.loads(body).get("event_type")
    except (ValueError, AttributeError):
        return
    if event_type != topic:
        click.echo(
            f"note: the body's event_type is {event_type!r}; "
            "the relay uses that as the topic",
            err=True,
        )


@click.group("failed")
def failed():
    """List, show, requeue and purge failed deliveries."""


def _filters(command):
    """The options that choose failed deliveries, shared by every subcommand."""
    options = [
        click.option("--source", type=click.Choice(["shopify", "typeform"])),
        click.option("--topic", help="Exact topic, e.g. customers/update."),
        click.option("--since", type=_Moment(), help="Failed at or after (ISO time)."),
        click.option("--until", type=_Moment(), help="Failed at or before (ISO time)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _Moment(click.ParamType):
    name = "TIME"

    def convert(self, value, param, ctx):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO time like 2026-12-04T10:00", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _chosen(ids, source, topic, since, until):
    queue = current_app.extensions["relay"]["queue"]
    everything = failed_store.failed_deliveries(queue)
    return queue, failed_store.select(
        everything, source=source, topic=topic, since=since, until=until, ids=ids
    )


@failed.command("list")
@_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@with_appcontext
def failed_list(source, topic, since, until, as_json):
    """Failed deliveries, oldest first; emails in reasons masked."""
    _, chosen = _chosen((), source, topic, since, until)
    chosen.sort(key=lambda item: item.failed_at or datetime.min.replace(tzinfo=UTC))
    for item in chosen:
        row = item.summary()
        if as_json:
            click.echo(json.dumps(row, ensure_ascii=False))
        else:
            click.echo(
                f"{row['failed_at']}  {row['job']}  {row['source']} {row['topic']}  "
                f"delivery={row['delivery']}  attempts={row['attempts']}\n"
                f"    {row['reason']}"
            )
    if not as_json:
        click.echo(f"{len(chosen)} failed deliveries")


@failed.command("show")
@click.argument("ident")
@with_appcontext
def failed_show(ident):
    """One failed delivery by job id or delivery id; personal data masked."""
    _, chosen = _chosen((ident,), None, None, None, None)
    if not chosen:
        raise click.ClickException(f"no failed delivery {ident!r}")
    for item in chosen:
        row = item.summary()
        record = item.job.args[0] if item.job.args else {}
        row |= {
            "account": item.account,
            "received_at": record.get("received_at"),
            "event_at": record.get("event_at"),
            "requeued": item.job.meta.get("requeued", 0),
            "calls_done": sorted(item.job.meta.get("done", {})),
            "body_fields": sorted(record.get("body", {})),
        }
        click.echo(json.dumps(row, indent=2, ensure_ascii=False))


@failed.command("requeue")
@click.argument("ids", nargs=-1)
@_filters
@click.option("--all", "everything", is_flag=True, help="Every failed delivery.")
@with_appcontext
def failed_requeue(ids, source, topic, since, until, everything):
    """Put failed deliveries (by id, or chosen by filters) back on the queue."""
    _need_choice(ids, source, topic, since, until, everything)
    queue, chosen = _chosen(ids, source, topic, since, until)
    for item in chosen:
        failed_store.requeue(queue, item)
        click.echo(
            f"requeued {item.job_id} ({item.source} {item.topic} {item.delivery_id})"
        )
    click.echo(f"{len(chosen)} requeued")


@failed.command("purge")
@click.argument("ids", nargs=-1)
@_filters
@click.option("--all", "everything", is_flag=True, help="Every failed delivery.")
@with_appcontext
def failed_purge(ids, source, topic, since, until, everything):
    """Delete failed deliveries (by id, or chosen by filters) for good."""
    _need_choice(ids, source, topic, since, until, everything)
    queue, chosen = _chosen(ids, source, topic, since, until)
    for item in chosen:
        failed_store.purge(queue, item)
    click.echo(f"{len(chosen)} purged")


def _need_choice(ids, source, topic, since, until, everything):
    # Acting on every failed delivery must be asked for in so many words.
    if not (ids or source or topic or since or until or everything):
        raise click.UsageError("name job or delivery ids, give a filter, or --all")


COMMANDS = [send, failed]
