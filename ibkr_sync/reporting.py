"""Error reports without the passwords that URL-valued settings carry.

Django's error reports (mailed to ADMINS, shown on DEBUG's error page, read by error
trackers through the same filter) list every setting and the request's environment, and
hide a value by its setting's name only (`PASSWORD`, `SECRET`, `KEY`, `TOKEN`...). The
task queue's settings are URLs whose names say nothing of the password inside them:
`CELERY_BROKER_URL=redis://:secret@host`, a result backend, a cache's `LOCATION`, and,
under a development server whose request environment is the process's, `DATABASE_URL`.
`ReporterFilter` hides the password of any URL in any setting or environment value,
whatever its name, and keeps the rest (scheme, user, host, port: which broker it was).

The project's settings use it (`DEFAULT_EXCEPTION_REPORTER_FILTER`); a host sets it in
its own.
"""

from __future__ import annotations

import re
from typing import Any

from django.views.debug import SafeExceptionReporterFilter

# scheme://user:password@ (the user may be empty: redis://:password@host). As the URL's
# parsers read it (urllib's, kombu's), the credentials run to the last "@" of the URL's
# authority (which ends at "/", "?", "#" or a space), and the password is what follows
# their first ":": an "@" left unencoded in the user (an e-mail address) or the password
# is part of it.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^:/?#\s]*:)[^/?#\s]+(?=@)", re.I)


def hide_url_passwords(text: str, substitute: str = "********************") -> str:
    """`text` with the password of each URL in it replaced by `substitute`."""
    return _URL_PASSWORD.sub(lambda match: match.group("head") + substitute, text)


class ReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, and the password of every URL in a setting (at any depth: a
    cache's LOCATION) or in the request's environment hidden."""

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):
            return hide_url_passwords(cleansed, self.cleansed_substitute)
        return cleansed
