"""``python -m app <command>`` (``bin/relay <command>``): the operator commands.

The same commands are on ``flask --app app``; this entry point shows only the
relay's own, not Flask's development server, shell and options.
"""

import sys

import redis
from flask.cli import AppGroup, ScriptInfo

from app import cli, create_app
from app.connections import explain

relay_cli = AppGroup(
    "relay",
    help="copernica-relay operator commands. Run a command with --help for more.",
)
for command in cli.COMMANDS:
    relay_cli.add_command(command)

if __name__ == "__main__":
    try:
        relay_cli.main(
            obj=ScriptInfo(
                create_app=lambda: create_app(announce=False, check_redis=False)
            ),
            prog_name="bin/relay",
        )
    except redis.RedisError as error:
        # The commands that read the queue need Redis; say so in one line.
        sys.stderr.write(
            f"Error: Redis not reachable ({explain(error)}); start bin/run "
            "or set REDIS_URL\n"
        )
        sys.exit(1)
