"""Operator commands: ``bin/relay <command>``, ``python -m app <command>`` or
``flask --app app <command>``."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click
import redis
import requests
from flask import Flask, current_app
from flask.cli import with_appcontext

from app import failed as failed_store
from app.connections import (
    REQUIRED_POLICY,
    EvictionPolicyRefused,
    check_eviction_policy,
    explain,
)
from app.signatures import TYPEFORM_PREFIX, sign
from worker.copernica import AuthenticationRefused, TransportError
from worker.jobs import client_for
from worker.mapping import load_privacy
from worker.schema import SchemaCache, SchemaUnavailable

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
    """List, show, requeue and purge failed deliveries.

    Deliveries are named by job id or delivery id. Times are ISO
    (2026-12-04T10:00), in UTC unless they carry an offset, and are matched
    against when the delivery failed.
    """


def _filters(command):
    """The options that choose failed deliveries, shared by every subcommand."""
    options = [
        click.option(
            "--source",
            type=click.Choice(["shopify", "typeform"]),
            help="Only deliveries from this source.",
        ),
        click.option("--topic", help="Only this exact topic, e.g. customers/update."),
        click.option(
            "--since",
            type=_Moment(),
            help="Failed at or after this time (ISO, UTC unless offset).",
        ),
        click.option(
            "--until",
            type=_Moment(),
            help="Failed at or before this time (ISO, UTC unless offset).",
        ),
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
    """List failed deliveries, oldest first, emails masked."""
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
        click.echo(_count(len(chosen), "failed delivery", "failed deliveries"))


@failed.command("show")
@click.argument("ident")
@with_appcontext
def failed_show(ident):
    """Show one failed delivery, personal data masked."""
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
    """Put failed deliveries back on the queue.

    Name job or delivery ids, or choose with the filters; every failed
    delivery takes --all. Each is mapped again with the mapping in force.
    """
    _need_choice(ids, source, topic, since, until, everything)
    queue, chosen = _chosen(ids, source, topic, since, until)
    _all_found(ids, chosen)
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
    """Delete failed deliveries for good.

    Name job or delivery ids, or choose with the filters; every failed
    delivery takes --all.
    """
    _need_choice(ids, source, topic, since, until, everything)
    queue, chosen = _chosen(ids, source, topic, since, until)
    _all_found(ids, chosen)
    for item in chosen:
        failed_store.purge(queue, item)
    click.echo(f"{len(chosen)} purged")


def _all_found(ids, chosen) -> None:
    # A mistyped id must not pass as "0 requeued".
    found = {item.job_id for item in chosen} | {item.delivery_id for item in chosen}
    unknown = [ident for ident in ids if ident not in found]
    if unknown:
        raise click.ClickException(
            f"no failed delivery {', '.join(map(repr, unknown))}; nothing done"
        )


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _need_choice(ids, source, topic, since, until, everything):
    # Acting on every failed delivery must be asked for in so many words.
    if not (ids or source or topic or since or until or everything):
        raise click.UsageError("name job or delivery ids, give a filter, or --all")


@click.command("check")
@click.option(
    "--offline",
    is_flag=True,
    help="Check configuration and mapping only; do not ask Copernica.",
)
@with_appcontext
def check(offline):
    """Check configuration and mapping, and the mapping against Copernica.

    Reading the configuration and the mapping already happened before this
    runs (a problem there stops it with exit code 2). Then every database a
    rule or the privacy section writes to is asked for its fields and
    collections, and every field the mapping names must exist there. Exit
    code 1 when something is missing or Copernica cannot be asked.
    """
    from worker.schema import privacy_problems, rule_problems

    relay = current_app.extensions["relay"]
    settings, rules = relay["settings"], relay["rules"]
    privacy = load_privacy(settings.mappings_path, settings.copernica_database)
    click.echo(f"configuration: ok ({len(rules)} rules from {settings.mappings_path})")
    for source in ("shopify", "typeform"):
        count = len(settings.secrets_for(source))
        click.echo(
            f"  {source}: {count or 'NO'} secret(s)"
            + ("" if count else " - its webhooks are answered 503")
        )

    _check_redis(relay["redis"], settings)

    if offline or settings.dry_run:
        why = "--offline" if offline else "no COPERNICA_ACCESS_TOKEN (dry run)"
        click.echo(f"Copernica not asked: {why}")
        return

    client = client_for(context_for(settings, rules, privacy), relay["redis"])
    try:
        # A fresh token exchange (v4), so a wrong or revoked token shows here
        # and not only when the cached JWT runs out.
        client.credentials.renew()
    except AuthenticationRefused as error:
        raise click.ClickException(f"Copernica refused the token: {error}") from None
    except TransportError as error:
        raise click.ClickException(
            f"could not reach Copernica's token endpoint: {error}"
        ) from None
    schemas = SchemaCache(
        relay["redis"],
        client.send,
        client.api,
        settings.schema_ttl_seconds,
        account=f"{settings.copernica_base_url}\n{settings.copernica_access_token}",
    )
    targets: dict[str, list] = {}
    for rule in rules:
        targets.setdefault(rule.database, []).append(rule)
    if privacy.database not in targets:
        targets[privacy.database] = []

    failures = 0
    for database, database_rules in targets.items():
        try:
            # Fresh, and stored: the workers check against it from now on.
            schema = schemas.get(database, fresh=True)
        except (SchemaUnavailable, TransportError, AuthenticationRefused) as error:
            click.echo(f"database {database}: {error}")
            failures += 1
            continue
        checks = [(rule.name, rule_problems(rule, schema)) for rule in database_rules]
        if privacy.database == database:
            checks.append(("privacy", privacy_problems(privacy, schema)))
        for name, problems in checks:
            for problem in problems:
                click.echo(f"database {database}: {name}: {problem}")
            failures += len(problems)
        if not any(problems for _, problems in checks):
            names = ", ".join(name for name, _ in checks)
            click.echo(
                f"database {database}: ok ({len(schema.fields)} fields, "
                f"{len(schema.collections) // 2} collection(s); checked {names})"
            )
    if failures:
        raise click.ClickException(_count(failures, "problem", "problems") + " found")
    click.echo("mapping matches Copernica")


def _check_redis(connection, settings) -> None:
    # Part of --offline too: Redis is the relay's own, and the release phase
    # should stop a deployment whose Redis would evict queued events.
    try:
        policy = check_eviction_policy(connection, settings.allow_eviction)
    except EvictionPolicyRefused as refused:
        raise click.ClickException(str(refused)) from None
    except redis.RedisError as error:
        raise click.ClickException(f"Redis not reachable: {explain(error)}") from None
    allowed = "" if policy == REQUIRED_POLICY else " (allowed by RELAY_ALLOW_EVICTION)"
    click.echo(f"redis: ok (maxmemory-policy {policy}{allowed})")


def context_for(settings, rules, privacy):
    from worker.jobs import WorkerContext

    return WorkerContext(settings, rules, privacy)


COMMANDS = [send, failed, check]
