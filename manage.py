#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys

# sysexits.h EX_CONFIG: cron and service managers can tell a bad setting from a failure.
EXIT_CONFIG_ERROR = 78


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portfolio_site.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A malformed environment variable: say which, without a traceback.
        print(f"Configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


if __name__ == "__main__":
    main()
