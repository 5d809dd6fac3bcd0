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


COMMANDS = [send]
