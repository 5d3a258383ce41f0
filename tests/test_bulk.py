"""The bulk SQL helpers: `insert_missing`, the insert that concurrent writers share."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext

from ibkr_sync import bulk
from portfolio.models import Account, Instrument

pytestmark = pytest.mark.django_db

UNIQUE = ("broker", "external_id")


def instrument(conid: str, symbol: str = "X") -> dict:
    return {"broker": "ibkr", "external_id": conid, "symbol": symbol, "sec_type": "STK"}


def test_it_inserts_the_new_rows_and_gives_every_rows_key():
    before = Instrument.objects.create(**instrument("2", "OLD"))
    keys = bulk.insert_missing(
        Instrument, [instrument("3"), instrument("2"), instrument("1")], UNIQUE
    )
    stored = dict(Instrument.objects.values_list("external_id", "pk"))
    assert keys == {("ibkr", conid): pk for conid, pk in stored.items()}
    assert len(stored) == 3
    # The row that was there is taken as it is, not overwritten.
    assert Instrument.objects.get(pk=before.pk).symbol == "OLD"


def test_without_conflicts_it_costs_the_statements_of_insert_rows():
    rows = [instrument(str(i)) for i in range(bulk.BATCH_SIZE + 3)]
    with CaptureQueriesContext(connection) as missing:
        keys = bulk.insert_missing(Instrument, rows, UNIQUE)
    assert len(keys) == len(rows) == Instrument.objects.count()
    statements = [q["sql"] for q in missing.captured_queries]
    inserts = [sql for sql in statements if sql.startswith("INSERT")]
    assert all("ON CONFLICT" in sql for sql in inserts)
    if connection.vendor == "postgresql":
        # COPYed into the scratch table (the driver's COPY, not a statement of Django's),
        # then one INSERT ... SELECT: a fixed number of statements, whatever the rows.
        assert len(inserts) == 1 and len(statements) == 4, statements
    else:
        assert len(inserts) == len(statements) == 2  # one INSERT per batch, nothing read back


def test_rows_are_inserted_in_the_order_of_their_key():
    """Two writers of the same new rows wait for each other in one order."""
    keys = bulk.insert_missing(Instrument, [instrument(c) for c in "cab"], UNIQUE)
    by_pk = sorted(keys.items(), key=lambda item: item[1])
    assert [conid for (_, conid), _ in by_pk] == ["a", "b", "c"]


def test_any_other_refusal_is_an_error_not_a_silent_skip():
    # Only a conflict on the key is skipped: a NULL where none may be fails as ever.
    with pytest.raises(IntegrityError):
        bulk.insert_missing(
            Account, [{"broker": "ibkr", "external_id": "U2", "is_paper": None}], UNIQUE
        )


def test_nothing_to_insert_is_no_statement():
    with CaptureQueriesContext(connection) as queries:
        assert bulk.insert_missing(Instrument, [], UNIQUE) == {}
    assert not queries.captured_queries


#: JSON values whose texts hold what an array's text must quote or escape.
AWKWARD_JSON = [
    {"a": 'say "hi"', "b": 'back\\slash \\" both', "c": "{braces}, commas"},
    {"null": None, "list": [1, "two", {"three": 3.5}], "empty": ""},
    {"unicode": "Zürich \u2013 東京 \u2003 emoji \U0001f600", "control": "tab\tnewline\n"},
    {},
    ["NULL", "null", None],
    "a plain string",
]


def test_a_json_column_s_array_is_the_one_the_driver_would_send(monkeypatch):
    """On PostgreSQL a JSON column's UNNEST array is written by `_json_array`, not the
    driver: the same values stored, whatever the JSON texts hold (on SQLite both paths
    are the one multi-row INSERT)."""
    from portfolio.models import AccountSnapshot

    account = Account.objects.create(broker="ibkr", external_id="U1234567")
    moment = dt.datetime(2026, 3, 13, 23, 59, 59, tzinfo=dt.UTC)

    def insert(offset: int) -> dict:
        rows = [
            {
                "account_id": account.pk,
                "taken_at": moment + dt.timedelta(seconds=offset + n),
                "exchange_rates": value,
            }
            for n, value in enumerate(AWKWARD_JSON)
        ]
        pks = bulk.insert_rows(AccountSnapshot, rows)
        stored = dict(
            AccountSnapshot.objects.filter(pk__in=pks).values_list("pk", "exchange_rates")
        )
        return [stored[pk] for pk in pks]

    ours = insert(0)
    monkeypatch.setattr(bulk, "_JSON_ARRAYS", False)
    the_driver_s = insert(100)
    assert ours == the_driver_s
    assert ours == AWKWARD_JSON


def test_a_datetime_and_a_json_object_are_prepared_as_django_prepares_them():
    """The writer's own preparers (`_datetime_preparer`, `_json_preparer`) call the
    backend's adaptation directly for an aware datetime and a dict: each value exactly
    what the field's `get_db_prep_save` gives, on either database; any other value goes
    that way itself."""
    from zoneinfo import ZoneInfo

    from portfolio.models import AccountSnapshot, Trade

    moments = [
        dt.datetime(2025, 3, 9, 1, 59, 59, 123456, tzinfo=ZoneInfo("America/New_York")),
        dt.datetime(2025, 3, 9, 3, 0, tzinfo=ZoneInfo("America/New_York")),
        dt.datetime(2025, 11, 2, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 1, 5, 45, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
        None,
    ]
    field = Trade._meta.get_field("traded_at")
    prepared = bulk._given_preparer(field)
    for moment in moments:
        assert prepared(moment) == field.get_db_prep_save(moment, connection)
        assert type(prepared(moment)) is type(field.get_db_prep_save(moment, connection))
    # The same moment again (a sync's rows share the write's), after others and after
    # None: the form of that moment, never the last one's.
    for moment in [*moments, *reversed(moments), moments[0], moments[0], None, moments[3]]:
        assert prepared(moment) == field.get_db_prep_save(moment, connection)
    field = AccountSnapshot._meta.get_field("exchange_rates")
    prepared = bulk._given_preparer(field)
    for value in [*AWKWARD_JSON, None]:
        ours, django_s = prepared(value), field.get_db_prep_save(value, connection)
        assert type(ours) is type(django_s)
        if hasattr(ours, "obj"):  # PostgreSQL: a Jsonb wrapper, dumped by the driver
            assert (ours.obj, ours.dumps(ours.obj)) == (django_s.obj, django_s.dumps(django_s.obj))
        else:
            assert ours == django_s


#: Texts that COPY's text format must escape: its separators, its NULL, backslashes.
AWKWARD_TEXTS = [
    "tab\there",
    "new\nline",
    "back\\slash",
    "\\N",
    "",
    "NULL",
    "q\"u'o",
    "Zürich 東京",
]


@pytest.mark.parametrize("through", ["copy", "statements"])
def test_more_rows_than_a_statement_takes_are_stored_as_given_and_keyed_in_order(
    through, monkeypatch
):
    """More rows than one statement takes: on PostgreSQL with psycopg 3 COPYed into a
    scratch table and inserted from it (`_copy_and_insert`), elsewhere (and with
    `_can_copy` off) a statement per batch. Either way every value is stored exactly as
    given (texts COPY must escape, NULLs, exact decimals, aware datetimes, JSON), and
    the keys come back in the rows' order."""
    from decimal import Decimal

    from portfolio.models import AccountSnapshot

    if through == "statements":
        monkeypatch.setattr(bulk, "_can_copy", lambda cursor: False)
    account = Account.objects.create(broker="ibkr", external_id="U1234567")
    moment = dt.datetime(2026, 3, 13, 23, 59, 59, 123456, tzinfo=dt.UTC)
    n = bulk.BATCH_SIZE * 2 + 7
    rows = [
        {
            "account_id": account.pk,
            "taken_at": moment - dt.timedelta(days=i),
            "currency": "USD" if i % 3 else "CHF",
            "net_liquidation": None if i % 5 == 0 else Decimal(f"-{i}.{i:08d}"),
            "exchange_rates": AWKWARD_JSON[i % len(AWKWARD_JSON)],
        }
        for i in range(n)
    ]
    with CaptureQueriesContext(connection) as queries:
        pks = bulk.insert_rows(AccountSnapshot, rows)
    inserts = [q for q in queries.captured_queries if q["sql"].startswith("INSERT")]
    copied = connection.vendor == "postgresql" and through == "copy"
    assert len(inserts) == (1 if copied else 3)
    fields = list(rows[0])
    stored = {
        row[0]: dict(zip(fields, row[1:], strict=True))
        for row in AccountSnapshot.objects.filter(pk__in=pks).values_list("pk", *fields)
    }
    assert [stored[pk] for pk in pks] == rows

    texts = [
        {
            "broker": "ibkr",
            "external_id": str(i),
            "symbol": AWKWARD_TEXTS[i % len(AWKWARD_TEXTS)],
            "description": AWKWARD_TEXTS[(i + 3) % len(AWKWARD_TEXTS)] * 3,
            "sec_type": "STK",
            "multiplier": Decimal("0.000001") * i,
        }
        for i in range(n)
    ]
    keys = bulk.insert_missing(Instrument, texts[: bulk.BATCH_SIZE + 1] + texts, UNIQUE)
    assert len(keys) == n
    fields = list(texts[0])
    stored = {
        row[0]: dict(zip(fields, row[1:], strict=True))
        for row in Instrument.objects.values_list("pk", *fields)
    }
    assert [stored[keys["ibkr", row["external_id"]]] for row in texts] == texts
