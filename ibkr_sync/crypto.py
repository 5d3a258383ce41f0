"""Secrets at rest: a connection's Flex token, encrypted with a key from the settings.

The primitive is the `cryptography` package's Fernet (AES-128-CBC with HMAC-SHA256,
authenticated, with a timestamp), through MultiFernet for rotation: nothing here is our
own cryptography. The Fernet keys are derived (HKDF-SHA256, an info string of this
purpose) from a secret of the settings:

- `IBKR_SYNC_SECRET_KEY` when set, else Django's `SECRET_KEY`: the key new values are
  encrypted with;
- `IBKR_SYNC_SECRET_KEY_FALLBACKS` (and, while `SECRET_KEY` is the key, Django's
  `SECRET_KEY_FALLBACKS`): former keys, still read, never written with.

Rotation, as Django's SECRET_KEY rotation: set the new key, move the old one into the
fallbacks, run `manage.py ibkr_connection rotate-keys` (every stored value re-encrypted
with the new key), then drop the old key from the fallbacks.

A value that none of the keys decrypts raises `SecretUnreadable`, whose message names
the settings to check and never holds the value.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.views.decorators.debug import sensitive_variables

from . import conf
from .exceptions import SecretUnreadable

#: What the derived keys are for: a key derived for another purpose never decrypts these.
_PURPOSE = b"django-ibkr-sync: connection secrets at rest, v1"


# The secrets and the values they encrypt are hidden from the error reports Django mails
# (each frame's variables), should anything here fail.
@lru_cache(maxsize=32)
@sensitive_variables("secret", "key")
def _fernet(secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(
        secret.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


@sensitive_variables("own", "current", "fallbacks")
def secrets() -> tuple[str, ...]:
    """The secrets keys are derived from, the current one first."""
    own = conf.app_settings.IBKR_SYNC_SECRET_KEY
    fallbacks = tuple(conf.app_settings.IBKR_SYNC_SECRET_KEY_FALLBACKS)
    if own:
        current = own
    else:
        current = getattr(settings, "SECRET_KEY", "") or ""
        fallbacks += tuple(getattr(settings, "SECRET_KEY_FALLBACKS", ()) or ())
        if not current:
            raise ImproperlyConfigured(
                "Neither IBKR_SYNC_SECRET_KEY nor SECRET_KEY is set: a Flex token cannot be "
                "encrypted."
            )
    return tuple(dict.fromkeys((current, *fallbacks)))


@sensitive_variables("secret")
def _keys() -> MultiFernet:
    return MultiFernet([_fernet(secret) for secret in secrets()])


@sensitive_variables("value")
def encrypt(value: str) -> str:
    """`value` encrypted with the current key (text, safe to store)."""
    return _fernet(secrets()[0]).encrypt(value.encode()).decode("ascii")


def decrypt(stored: str, *, what: str = "the stored secret") -> str:
    """What `encrypt` was given, with the current key or a fallback."""
    try:
        return _keys().decrypt(stored.encode("ascii")).decode()
    except (InvalidToken, UnicodeError, ValueError):
        raise SecretUnreadable(
            f"{what} cannot be decrypted with IBKR_SYNC_SECRET_KEY (or SECRET_KEY) nor any "
            "of their fallbacks: the key changed without the old one in "
            "IBKR_SYNC_SECRET_KEY_FALLBACKS. Put the old key back as a fallback, or save the "
            "secret again."
        ) from None


def is_current(stored: str) -> bool:
    """Whether `stored` is encrypted with the current key (nothing to rotate)."""
    try:
        _fernet(secrets()[0]).decrypt(stored.encode("ascii"))
    except (InvalidToken, ValueError):
        return False
    return True


def rotate(stored: str, *, what: str = "the stored secret") -> str:
    """`stored` re-encrypted with the current key (read with any key)."""
    try:
        return _keys().rotate(stored.encode("ascii")).decode("ascii")
    except (InvalidToken, ValueError):
        decrypt(stored, what=what)  # raises the message that says what to do
        raise
