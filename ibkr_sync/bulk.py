"""Generic bulk SQL for the writer: many rows in a fixed number of statements.

Nothing here knows positions or brokers; each helper takes a model and rows of plain
values, as Django's `bulk_create` / `bulk_update` would, only faster at 10,000s of rows:

- `insert_rows`: a multi-row INSERT ... RETURNING per batch (UNNEST arrays on
  PostgreSQL; more rows than a batch there: COPYed, then one INSERT ... SELECT), every
  field filled as `bulk_create` fills it (`_InsertPlan`).
- `insert_missing` / `insert_new`: the same INSERT with ON CONFLICT DO NOTHING on a
  unique key, for rows that concurrent writers may insert at the same moment; the keys
  of every row, inserted by it or by another (`insert_new`: of those it inserted).
- `update_rows`: one UPDATE ... FROM per batch (a COPYed scratch table on PostgreSQL).
- `upsert`: `bulk_create(update_conflicts=True)` that renews `auto_now` stamps too.
- `touched`: the values of an UPDATE with its `auto_now` stamps.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from django.db import IntegrityError, connection, models
from django.db.models.fields import AutoFieldMixin

# Rows per statement: below SQLite's bound-parameter limit for the widest statement.
BATCH_SIZE = 500


def update_rows(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
    **constants: Any,
) -> None:
    """UPDATE existing rows given as (pk, *values of `fields`), setting `constants` on each
    too, where bulk_update's CASE WHEN per field grows with the rows: on PostgreSQL one
    UPDATE ... FROM a temporary table the rows are COPYed into (UNNEST arrays per batch
    without psycopg 3), on SQLite one UPDATE ... FROM a VALUES list per batch. The model's
    `auto_now` fields are set too, as `Model.save()` would; keys and values are put in the
    database's form as `insert_rows` puts them (a UUID key as hex text on SQLite)."""
    meta = model._meta
    constants = {k: v for k, v in touched(model, **constants).items() if k not in fields}
    columns = [meta.get_field(name) for name in fields]
    preset = [(meta.get_field(name), value) for name, value in constants.items()]
    qn = connection.ops.quote_name
    table, pk = qn(meta.db_table), qn(meta.pk.column)
    names = ["pk", *(f"v{i}" for i in range(len(columns)))]
    assignments = [f"{qn(f.column)} = v.{name}" for f, name in zip(columns, names[1:], strict=True)]
    assignments += [f"{qn(f.column)} = %s" for f, _ in preset]
    preset_params = [f.get_db_prep_save(value, connection) for f, value in preset]
    vendor = connection.vendor
    if vendor == "sqlite" and connection.Database.sqlite_version_info < (3, 33):
        vendor = "other"  # no UPDATE ... FROM before SQLite 3.33
    if vendor not in ("postgresql", "sqlite"):
        for chunk in batches(rows, BATCH_SIZE):
            model.objects.bulk_update(
                [
                    model(pk=row[0], **dict(zip(fields, row[1:], strict=True)), **constants)
                    for row in chunk
                ],
                [*fields, *constants],
            )
        return
    prepare = [_given_preparer(meta.pk), *map(_given_preparer, columns)]
    if any(prepare):
        rows = (
            tuple(v if p is None else p(v) for v, p in zip(row, prepare, strict=True))
            for row in rows
        )
    with connection.cursor() as cursor:
        if vendor == "postgresql" and _can_copy(cursor):
            _copy_to_scratch(cursor, meta.pk, columns, names, rows)
            cursor.execute(f"UPDATE {table} SET {', '.join(assignments)} FROM {_UPDATES} v "
                           f"WHERE {table}.{pk} = v.pk", preset_params)  # fmt: skip
            cursor.execute(f"DROP TABLE {_UPDATES}")
            return
        for chunk in batches(rows, min(BATCH_SIZE, _MAX_PARAMETERS // len(names))):
            if vendor == "postgresql":
                types = [meta.pk.rel_db_type(connection).split("(")[0]]
                types += [_array_type(f) for f in columns]
                arrays = ", ".join(f"%s::{t}[]" for t in types)
                sql = (
                    f"UPDATE {table} SET {', '.join(assignments)} FROM UNNEST({arrays}) "
                    f"AS v({', '.join(names)}) WHERE {table}.{pk} = v.pk"
                )
                params = [list(column) for column in zip(*chunk, strict=True)]
                cursor.execute(sql, [*preset_params, *params])
            else:
                one_row = "(" + ", ".join(["%s"] * len(names)) + ")"
                sql = (
                    f"WITH v({', '.join(names)}) AS (VALUES {', '.join([one_row] * len(chunk))}) "
                    f"UPDATE {table} SET {', '.join(assignments)} FROM v "
                    f"WHERE {table}.{pk} = v.pk"
                )
                cursor.execute(sql, [*(value for row in chunk for value in row), *preset_params])


def _can_copy(cursor: Any) -> bool:
    return hasattr(cursor.cursor, "copy")  # psycopg 3 (psycopg2 copies otherwise)


#: The session's own scratch table for `update_rows` on PostgreSQL.
_UPDATES = "pg_temp.ibkr_sync_updates"


def _copy_to_scratch(
    cursor: Any,
    pk_field: models.Field,
    columns: Sequence[models.Field],
    names: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
) -> None:
    """PostgreSQL: the rows COPYed into a temporary table, for one UPDATE ... FROM it (three
    times faster than batches of UPDATE ... FROM UNNEST at 10,000 rows; a fixed number of
    statements whatever their number)."""
    types = [pk_field.rel_db_type(connection)]
    types += [f.db_type(connection) for f in columns]
    definition = ", ".join(f"{name} {kind}" for name, kind in zip(names, types, strict=True))
    cursor.execute(f"DROP TABLE IF EXISTS {_UPDATES}")
    cursor.execute(f"CREATE TEMPORARY TABLE {_UPDATES.split('.')[1]} ({definition})")
    with cursor.cursor.copy(f"COPY {_UPDATES} FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def insert_rows(model: type[models.Model], rows: Iterable[dict[str, Any]]) -> list[Any]:
    """INSERT rows given as {field attname: value}; return their new primary keys, in order.

    The fast path for the 10,000s of rows of a first sync. `bulk_create` runs every
    value of every object through the generic field API, which then costs more than the
    database does. The values a row gives are already what the database adapters take
    (str, int, Decimal, None: the driver adapts them exactly as Django would), so only
    the fields whose preparation is not that identity go through it (a datetime once per
    distinct value). Every other field of the model is filled as Django's `bulk_create`
    fills it (`_InsertPlan`): a host's models may have a UUID primary key, `auto_now`
    stamps, defaults and database defaults of their own. Every row gives the same fields.
    A batch is one statement of the form Django's own bulk_create issues (tests compare
    the two): on PostgreSQL INSERT ... SELECT * FROM UNNEST(one array per column), unless a
    column cannot be an array (as Django decides), elsewhere a multi-row INSERT ... VALUES;
    both RETURNING the new keys, in the rows' order. On PostgreSQL with psycopg 3, more rows
    than one statement takes are COPYed and inserted by one statement instead
    (`_copy_and_insert`).
    """
    return _insert(model, rows)


def insert_missing(
    model: type[models.Model],
    rows: Iterable[dict[str, Any]],
    unique: Sequence[str],
    *,
    taken: set[tuple[Any, ...]] | None = None,
) -> dict[tuple[Any, ...], Any]:
    """INSERT the rows whose `unique` fields (a unique constraint's, plain text or integer
    columns) no row has yet, ON CONFLICT DO NOTHING; return the primary key of every
    row given, by its `unique` values: inserted by this statement, or by another writer,
    before or at the same moment (read back: RETURNING gives only the rows inserted).

    Concurrent writers of the same new rows (syncs of several connections holding the
    same contracts) all succeed: on PostgreSQL a row another transaction is inserting
    makes this one wait for it to commit, then skips it; on SQLite writers take turns.
    As fast as `insert_rows` when nothing conflicts: one more column RETURNED, no more
    statements. `taken`, if given, gains the `unique` values of the rows that another
    writer had inserted (found, not inserted here).
    """
    rows = list(rows)
    keys = insert_new(model, rows, unique)
    names = [model._meta.get_field(name).attname for name in unique]
    skipped = [row for row in rows if tuple(row[name] for name in names) not in keys]
    if taken is not None:
        taken.update(tuple(row[name] for name in names) for row in skipped)
    for chunk in chunks(skipped):
        found = model._default_manager.filter(
            **{f"{name}__in": {row[name] for row in chunk} for name in names}
        ).values_list(*names, "pk")
        keys.update((tuple(key), pk) for *key, pk in found)
    missing = [row for row in skipped if tuple(row[name] for name in names) not in keys]
    if missing:  # refused by another unique constraint than `unique`
        raise IntegrityError(
            f"{model._meta.label}: {len(missing)} row(s) were neither inserted nor found by "
            f"{', '.join(unique)}."
        )
    return keys


def insert_new(
    model: type[models.Model], rows: Iterable[dict[str, Any]], unique: Sequence[str]
) -> dict[tuple[Any, ...], Any]:
    """`insert_missing` without reading back: the primary keys of the rows this statement
    inserted only, by their `unique` values. The rows are inserted in the order of their
    `unique` values, so that two writers waiting for each other's rows wait in one order,
    never in a circle."""
    names = [model._meta.get_field(name).attname for name in unique]
    rows = sorted(rows, key=lambda row: tuple(row[name] for name in names))
    return {tuple(key): pk for pk, *key in _insert(model, rows, conflict=unique)}


def _insert(
    model: type[models.Model], rows: Iterable[dict[str, Any]], conflict: Sequence[str] = ()
) -> list[Any]:
    """`insert_rows`; with `conflict`, ON CONFLICT (those fields) DO NOTHING, returning
    (primary key, *values of those fields) for each row inserted."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return []
    plan = _InsertPlan(model, first.keys())
    meta = model._meta
    qn = connection.ops.quote_name
    columns = ", ".join(qn(f.column) for f in plan.fields)
    head = f"INSERT INTO {qn(meta.db_table)} ({columns}) "
    tail = f" RETURNING {qn(meta.pk.column)}"
    if conflict:
        targets = ", ".join(qn(meta.get_field(name).column) for name in conflict)
        tail = f" ON CONFLICT ({targets}) DO NOTHING{tail}, {targets}"
    if plan.unnest:
        # Array types without their length/precision, as Django does: varchar[], numeric[].
        arrays = ", ".join(f"%s::{_array_type(f)}[]" for f in plan.fields)
        statement = f"{head}SELECT * FROM UNNEST({arrays}){tail}"
    one_row = "(" + ", ".join(["%s"] * len(plan.fields)) + ")"
    pks: list[Any] = []
    with connection.cursor() as cursor:
        size = min(BATCH_SIZE, _MAX_PARAMETERS // len(plan.fields))
        pending = batches(itertools.chain([first], rows), size)
        if plan.unnest and _can_copy(cursor):
            # More than one statement's rows: COPYed, then inserted by one statement.
            one = next(pending)
            two = next(pending, None)
            if two is not None:
                returned = _copy_and_insert(
                    cursor, plan, head, tail, itertools.chain([one, two], pending)
                )
                if conflict:
                    return [(plan.key(pk), *key) for pk, *key in returned]
                return [plan.key(pk) for (pk,) in returned]
            pending = iter([one])
        for chunk in pending:
            values = plan.values(chunk)
            if plan.unnest:
                cursor.execute(
                    statement,
                    [
                        _json_array(column) if json else list(column)
                        for column, json in zip(zip(*values, strict=True), plan.json, strict=True)
                    ],
                )
            else:
                sql = f"{head}VALUES {', '.join([one_row] * len(chunk))}{tail}"
                cursor.execute(sql, [value for row in values for value in row])
            if conflict:
                pks.extend((plan.key(pk), *key) for pk, *key in cursor.fetchall())
            else:
                pks.extend(plan.key(pk) for (pk,) in cursor.fetchall())
    return pks


#: The session's own scratch table for `_insert` on PostgreSQL (`_copy_and_insert`).
_INSERTS = "pg_temp.ibkr_sync_inserts"


def _copy_and_insert(
    cursor: Any, plan: _InsertPlan, head: str, tail: str, chunks: Iterable[list[Any]]
) -> list[tuple[Any, ...]]:
    """PostgreSQL with psycopg 3, for more rows than one statement takes: the rows COPYed
    into a temporary table as they come (each with its number), then inserted from it by
    one INSERT ... SELECT in their order, RETURNING as the batches would (the new keys in
    the rows' order: as Django's bulk_create, the order in which the database inserts
    them). The driver writes COPY's text in C; an UNNEST statement's arrays are quoted
    element by element in Python (a regular expression's search per value), most of a
    first sync's time on PostgreSQL. The same columns, in the same types, as UNNEST: the
    stored rows are the same (`tests/test_bulk.py`)."""
    names = ", ".join(f"c{i}" for i in range(len(plan.fields)))
    definition = ", ".join(f"c{i} {f.db_type(connection)}" for i, f in enumerate(plan.fields))
    cursor.execute(f"DROP TABLE IF EXISTS {_INSERTS}")
    cursor.execute(f"CREATE TEMPORARY TABLE {_INSERTS.split('.')[1]} (n bigint, {definition})")
    number = itertools.count()
    with cursor.cursor.copy(f"COPY {_INSERTS} (n, {names}) FROM STDIN") as copy:
        for chunk in chunks:
            for row in plan.values(chunk):
                copy.write_row((next(number), *row))
    cursor.execute(f"{head}SELECT {names} FROM {_INSERTS} ORDER BY n{tail}")
    returned = cursor.fetchall()
    cursor.execute(f"DROP TABLE {_INSERTS}")
    return returned


class _InsertPlan:
    """How each column of a model gets its value in `insert_rows`: as Django's bulk_create
    would give it, for fields the rows leave out as for those they give.

    - Left out of the statement, for the database to fill, as Django leaves them: a
      generated field, an auto-incremented primary key, and a field with a database
      default (`db_default`) and no Python default.
    - A field the rows leave out gets its default: a callable one (uuid4, say) called
      anew for every row, as `Model()` does; a primary key with a default too. A field
      with neither is NULL (or '' for a text field not null), as `Model()` leaves it; the
      system checks refuse the fields of a host's own that this cannot fill
      (`ibkr_sync.E007`).
    - Then `pre_save(obj, add=True)`, where the field's class has one of its own:
      `auto_now` and `auto_now_add` stamps are set whatever the row gave, once per
      statement (Django stamps each object microseconds apart; rows inserted by one
      statement are inserted at one time); any other field's own pre_save for each row.
    - Then the database's form (`get_db_prep_save`), except where that is the identity for
      the values the writer gives (text, integer, decimal and boolean fields, and foreign
      keys to such keys): a UUID key is its hex string on SQLite, for instance; a date is
      prepared once per distinct value, an aware datetime and a JSON object by the
      backend's adaptation directly (`_datetime_preparer`, `_json_preparer`).
    """

    def __init__(self, model: type[models.Model], given: Iterable[str]) -> None:
        given = set(given)
        self.fields = [f for f in model._meta.concrete_fields if _inserted(f, given)]
        self.names = [f.attname for f in self.fields]
        # attname -> the prepared value every row gets (a default), or every row of a
        # statement (an auto_now / auto_now_add stamp, set by `values`).
        self.fixed: dict[str, Any] = {}
        self.stamps = [f for f in self.fields if _is_stamp(f)]
        self.per_row: list[models.Field] = []  # fields whose callable default each row calls
        defaults: dict[str, Any] = {}
        for f in self.fields:
            if f.attname in given or f in self.stamps:
                continue
            if f.has_default() and callable(f.default):
                self.per_row.append(f)
            else:
                defaults[f.attname] = f.get_default()
        self.hooks = [f for f in self.fields if _has_pre_save(f) and f not in self.stamps]
        self.defaults = defaults if self.hooks else {}  # what a hook may read
        for name, value in defaults.items():
            field = self.fields[self.names.index(name)]
            if field not in self.hooks:
                self.fixed[name] = field.get_db_prep_save(value, connection)
        self.prepare = [
            None
            if f.attname in self.fixed or f in self.stamps
            else _given_preparer(f)
            if f.attname in given and f not in self.hooks
            else functools.partial(f.get_db_prep_save, connection=connection)
            for f in self.fields
        ]
        self.unnest = connection.vendor == "postgresql" and all(map(_unnestable, self.fields))
        # The JSON columns (`_json_array`).
        self.json = [isinstance(f, models.JSONField) and _JSON_ARRAYS for f in self.fields]
        pk = model._meta.pk
        self.pk_column = pk.get_col(model._meta.db_table)
        self.converters = [
            *connection.ops.get_db_converters(self.pk_column),
            *pk.get_db_converters(connection),
        ]

    def values(self, rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
        """The rows of one statement in the database's form, one value per column."""
        instance = _Instance({})
        for f in self.stamps:
            self.fixed[f.attname] = f.get_db_prep_save(f.pre_save(instance, True), connection)
        fixed, names, prepare = self.fixed, self.names, self.prepare
        out = []
        for row in rows:
            if self.per_row or self.hooks:
                row = {**self.defaults, **row}
                for f in self.per_row:
                    row[f.attname] = f.get_default()
                instance = _Instance(row)
                for f in self.hooks:
                    row[f.attname] = f.pre_save(instance, True)
            out.append(
                [
                    fixed[name]
                    if name in fixed
                    else row[name]
                    if convert is None
                    else convert(row[name])
                    for name, convert in zip(names, prepare, strict=True)
                ]
            )
        return out

    def key(self, value: Any) -> Any:
        """A primary key RETURNING gave, as the ORM reads it (a UUID, not its hex text)."""
        for converter in self.converters:
            value = converter(value, self.pk_column, connection)
        return value


def _inserted(field: models.Field, given: set[str]) -> bool:
    """Whether an INSERT names the field, or leaves it to the database as Django does."""
    if field.generated:
        return False
    if field.attname in given:
        return True
    if isinstance(field, AutoFieldMixin):
        return False
    return field.has_default() or not field.has_db_default()


def _has_pre_save(field: models.Field) -> bool:
    """Whether the field's pre_save() may give another value than the one it holds."""
    return _is_stamp(field) or type(field).pre_save not in _PLAIN_PRE_SAVE


def _is_stamp(field: models.Field) -> bool:
    """An `auto_now` / `auto_now_add` field of Django's own date and time classes."""
    auto = getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
    return auto and type(field).pre_save in _PLAIN_PRE_SAVE


_PLAIN_PRE_SAVE = {
    models.Field.pre_save,
    models.DateField.pre_save,  # without auto_now / auto_now_add: the value held
    models.DateTimeField.pre_save,
    models.TimeField.pre_save,
}

#: Field classes whose database form of the writer's own values is the value itself.
_PLAIN_TYPES = {
    models.CharField,
    models.TextField,
    models.DecimalField,
    models.BooleanField,
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveBigIntegerField,
    models.PositiveSmallIntegerField,
    models.AutoField,
    models.BigAutoField,
    models.SmallAutoField,
}


def _given_preparer(field: models.Field) -> Any:
    """How a value the writer gives for `field` becomes the database's: None where it
    already is (the fast path), else as Django prepares it."""
    target = field.target_field if type(field) is models.ForeignKey else field
    if type(target) in _PLAIN_TYPES:
        return None
    if type(field) is models.DateField:
        return _CachedPreparer(field)
    if type(field) is models.DateTimeField:
        return _datetime_preparer(field)
    if type(field) is models.JSONField:
        return _json_preparer(field)
    return functools.partial(field.get_db_prep_save, connection=connection)


# A ledger's rows each have a moment of their own and raw attributes of their own: no
# cache helps, and Django's way to the database's form (get_db_prep_save, then
# get_db_prep_value, get_prep_value, to_python) is most of their cost. For the values
# that way leaves as they are until the backend's own adaptation (an aware datetime; a
# dict, for JSON), that adaptation is called directly: the same value
# (`tests/test_bulk.py` holds them equal); anything else goes Django's way.


def _datetime_preparer(field: models.Field) -> Any:
    adapt, prepare = connection.ops.adapt_datetimefield_value, field.get_db_prep_save
    # A sync's rows share their moments (the write's `now`: every position's opened_at
    # and last_synced_at, every value's valued_at): the same object is adapted once. A
    # datetime is immutable, so the same object has the same database form.
    last: list[Any] = [None, None]

    def prepared(value: Any) -> Any:
        if value is last[0]:
            return last[1]
        if type(value) is dt.datetime and value.utcoffset() is not None:
            last[1] = adapt(value)
            last[0] = value
            return last[1]
        return prepare(value, connection)

    return prepared


def _json_preparer(field: models.Field) -> Any:
    adapt, encoder, prepare = connection.ops.adapt_json_value, field.encoder, field.get_db_prep_save

    def prepared(value: Any) -> Any:
        if type(value) is dict:
            return adapt(value, encoder)
        return prepare(value, connection)

    return prepared


def _unnestable(field: models.Field) -> bool:
    """Django's own rule for a column of an INSERT ... UNNEST on PostgreSQL: a standard
    type, and one placeholder whatever the value."""
    target = field.target_field if field.is_relation else field
    return (
        not hasattr(field, "get_placeholder")
        and target.get_internal_type() in connection.data_types
    )


#: Whether a JSON column's UNNEST array is written here (`_json_array`), not by the driver.
_JSON_ARRAYS = True


def _json_array(column: Sequence[Any]) -> Any:
    """A JSON column's values as the array UNNEST reads (PostgreSQL): the array's text,
    each element the JSON text the driver would send (the `Jsonb` wrapper's own `dumps`),
    quoted and escaped by the array syntax's rules, None as NULL. The driver's own dump of
    such an array escapes each quote of each JSON text through a regular expression's
    callback: most of the time of inserting rows with a JSON column. A column holding
    anything else is left to the driver (a list)."""
    try:
        from psycopg.types.json import Jsonb
    except ImportError:  # psycopg2: its own adaptation
        return list(column)
    texts = []
    for value in column:
        if value is None:
            texts.append("NULL")
            continue
        if type(value) is not Jsonb or value.dumps is None:
            return list(column)
        text = value.dumps(value.obj)
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode()
        texts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(texts) + "}"


def _array_type(field: models.Field) -> str:
    return field.db_type(connection).split("(")[0]


class _Instance:
    """What a field's pre_save() reads and sets on a model instance: the row's values,
    by attname (a model instance per row would cost more than the INSERT)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__ = values


def touched(model: type[models.Model], **values: Any) -> dict[str, Any]:
    """`values` for an UPDATE of the model's rows, with its `auto_now` fields set as
    `Model.save()` would set them (a value given wins): Django's `QuerySet.update()` and
    `bulk_update()` leave them alone, so every UPDATE the writer issues sets them itself."""
    instance = _Instance({})
    stamps = {
        f.name: f.pre_save(instance, False)
        for f in model._meta.concrete_fields
        if getattr(f, "auto_now", False) and not f.generated
    }
    return {**stamps, **values}


def upsert(model: type[models.Model], objs: Sequence[models.Model], **options: Any) -> None:
    """`bulk_create(objs, update_conflicts=True, ...)`, with the model's `auto_now` fields
    among those a conflict updates (bulk_create stamps them on the rows it inserts, not on
    those it updates)."""
    update_fields = list(options.pop("update_fields"))
    update_fields += [name for name in touched(model) if name not in update_fields]
    model._default_manager.bulk_create(
        objs, update_conflicts=True, update_fields=update_fields, **options
    )


# Below SQLite's default limit of bound parameters per statement (32766 since 3.32).
_MAX_PARAMETERS = 30_000


class _CachedPreparer:
    """A field's database form of a value, computed once per distinct value (the dates and
    datetimes of a sync repeat: its own time, an option's expiry)."""

    def __init__(self, field: models.Field) -> None:
        self.field = field
        self.cache: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        if value not in self.cache:
            self.cache[value] = self.field.get_db_prep_save(value, connection)
        return self.cache[value]


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Any iterable in lists of `size`, taken as they are consumed."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def chunks(items: Sequence[Any], size: int | None = None) -> Iterator[Sequence[Any]]:
    """`items` in slices of `size` (BATCH_SIZE)."""
    size = size or BATCH_SIZE
    for start in range(0, len(items), size):
        yield items[start : start + size]
