"""The portfolio overview in the admin: net cost basis per currency (never added across
currencies), by account and by sec type, the chart, and the last sync's status."""

import datetime as dt
import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from ibkr_sync.exceptions import GatewayUnavailable, SyncAlreadyRunning
from ibkr_sync.models import SyncRun
from ibkr_sync.overview import Subtotal, bar_chart
from ibkr_sync.services import sync_positions
from portfolio.models import Position
from tests.conftest import FakeGateway, position
from tests.test_admin import client_for

pytestmark = pytest.mark.django_db

OVERVIEW = reverse("admin:portfolio_overview")
# Session, user, the accounts (with their latest snapshot's key), those snapshots, the
# cash, the grouped sum of the open positions, the history (counted per account, then its
# points), the latest finished sync run (the last success is the same row, or one more
# query), the income (the ledger's cash transactions summed by account, currency, kind
# and rate).
OVERVIEW_MAX_QUERIES = 11


def sync(gateway: FakeGateway) -> SyncRun:
    result = sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)
    return SyncRun.objects.get(pk=result.sync_run_id)


@pytest.fixture
def gateway() -> FakeGateway:
    usd = {"currency": "USD"}
    eur = {"currency": "EUR", "exchange": "IBIS"}
    return FakeGateway(
        accounts=("U1111111", "U2222222"),
        positions=[
            position(**usd),  # 10 x 150.25
            position(con_id=76792991, symbol="TSLA", quantity="0.5", average_cost="242.1", **usd),
            position(con_id=495512551, symbol="ES", sec_type="FUT", quantity="-2",
                     average_cost="251234.5", multiplier="50", last_trade_date="20261218", **usd),
            position(con_id=14, symbol="BMW", quantity="5", average_cost="98.7654321", **eur),
            position(account="U2222222", con_id=555, symbol="SAP", sec_type="OPT",
                     quantity="-2", average_cost="310", multiplier="100", strike=Decimal("120"),
                     right="C", last_trade_date="20261218", **eur),
            position(account="U2222222", con_id=272093, symbol="MSFT", quantity="3",
                     average_cost="410.1", **usd),
            # The broker reported no average cost: counted, but not in any sum.
            position(account="U2222222", con_id=99, symbol="ODD", quantity="7",
                     average_cost=None, **usd),
            # Closed below: not in the overview.
            position(account="U2222222", con_id=4815747, symbol="NVDA", quantity="100",
                     average_cost="120", **usd),
        ],
    )  # fmt: skip


@pytest.fixture
def portfolio(gateway):
    sync(gateway)
    gateway.positions.pop()
    return sync(gateway)


def overview(client):
    response = client.get(OVERVIEW)
    assert response.status_code == 200
    return response


def subtotals(items) -> list[tuple]:
    return [(s.currency, s.positions, s.cost_basis, s.without_cost_basis) for s in items]


def test_totals_per_currency_are_exact_and_never_mixed(admin_client, portfolio):
    data = overview(admin_client).context["overview"]

    assert subtotals(c.total for c in data.currencies) == [
        ("EUR", 2, Decimal("-126.1728395"), 0),  # 493.8271605 - 620
        ("USD", 5, Decimal("-499615.15"), 1),  # 1502.5 + 121.05 - 502469 + 1230.3
    ]
    # The same as summing the stored rows one by one, in Python.
    for currency in data.currencies:
        rows = Position.objects.open().filter(instrument__currency=currency.total.currency)
        assert currency.total.cost_basis == sum(p.cost_basis or 0 for p in rows)


def test_by_account_and_by_sec_type(admin_client, portfolio):
    data = overview(admin_client).context["overview"]

    assert [(a.external_id, subtotals(a.by_currency)) for a in data.accounts] == [
        ("U1111111", [("EUR", 1, Decimal("493.8271605"), 0),
                      ("USD", 3, Decimal("-500845.45"), 0)]),
        ("U2222222", [("EUR", 1, Decimal("-620"), 0), ("USD", 2, Decimal("1230.3"), 1)]),
    ]  # fmt: skip
    by_sec_type = {
        c.total.currency: [(t, s.cost_basis) for t, s in c.by_sec_type] for c in data.currencies
    }
    assert by_sec_type == {
        "EUR": [("OPT", Decimal("-620")), ("STK", Decimal("493.8271605"))],
        "USD": [("FUT", Decimal("-502469")), ("STK", Decimal("2853.85"))],
    }  # fmt: skip


def module(html: str, module_id: str) -> str:
    """One module of the overview (a div with that id), up to the next module."""
    return re.search(rf'<div class="module[^"]*" id="{module_id}".*?(?=<div class="module|\Z)',
                     html, re.S).group()  # fmt: skip


def test_the_page_shows_the_amounts_per_currency(admin_client, portfolio):
    html = overview(admin_client).text

    totals = module(html, "by-currency")
    usd = re.search(r'<tr data-currency="USD">.*?</tr>', totals, re.S).group()
    # Count, net cost basis, without a cost basis; no market value or P&L from IBKR yet.
    assert re.findall(r'<td class="num"[^>]*>([^<]*)</td>', usd) == [
        "5", "-499,615.15", "1", "-", "-"
    ]  # fmt: skip
    assert 'title="-499615.15"' in usd
    eur = re.search(r'<tr data-currency="EUR">.*?</tr>', totals, re.S).group()
    assert re.findall(r'<td class="num"[^>]*>([^<]*)</td>', eur) == ["2", "-126.17", "0", "-", "-"]
    assert 'title="-126.1728395"' in eur, "the exact amount on hover"
    account = re.search(
        r'<tr class="total" data-account="U1111111" data-currency="EUR">.*?</tr>', html, re.S
    ).group()
    assert ">493.83<" in account
    # USD and EUR are never added up, anywhere: not overall, not per account.
    for mixed in ("-499,741.32", "-500,351.62", "610.30"):
        assert mixed not in html


def test_the_chart_is_inline_svg_with_a_bar_per_sec_type(admin_client, portfolio):
    html = overview(admin_client).text

    charts = re.findall(r'<svg [^>]*role="img".*?</svg>', html, re.S)
    assert len(charts) == 2, "one chart per currency"
    usd = next(c for c in charts if 'aria-label="Net cost basis in USD by sec type"' in c)
    assert re.findall(r"<title>([^<]*)</title>", usd) == [
        "FUT: -502,469.00 USD", "STK: 2,853.85 USD"
    ]  # fmt: skip
    assert 'class="bar negative"' in usd
    # Nothing fetched from anywhere: no script, no external reference.
    assert "<script" not in html.split('id="content-main"')[1]
    assert "http" not in "".join(charts).replace("http://www.w3.org/2000/svg", "")


def test_bar_chart_geometry():
    chart = bar_chart([("FUT", Decimal("-300")), ("STK", Decimal("100"))])

    fut, stk = chart["bars"]
    plot = 560 - 70 - 130
    assert chart["zero"] == pytest.approx(70 + plot * 0.75)
    assert fut["x"] == pytest.approx(70, abs=0.1) and fut["negative"]
    assert fut["width"] == pytest.approx(plot * 0.75, abs=0.1)
    assert stk["x"] == chart["zero"] and stk["width"] == pytest.approx(plot * 0.25, abs=0.1)
    assert bar_chart([]) is None
    assert bar_chart([("STK", Decimal(0))])["bars"][0]["width"] == 1.0


def test_money_rounds_half_even_and_groups_thousands():
    assert Subtotal("USD", cost_basis=Decimal("1234567.885")).display == "1,234,567.88"
    assert Subtotal("USD", cost_basis=Decimal("-0.005")).display == "-0.00"
    assert Subtotal("USD", cost_basis=Decimal("29.8917822402")).exact == "29.8917822402"


def test_links_to_the_positions_behind_each_figure(admin_client, portfolio):
    html = overview(admin_client).text.replace("&amp;", "&")
    positions = reverse("admin:portfolio_position_changelist")

    assert f'href="{positions}?instrument__currency__exact=EUR"' in html
    assert f'href="{positions}?instrument__currency__exact=USD&instrument__sec_type=FUT"' in html
    link = re.search(
        rf'href="({positions}\?account__id__exact=\d+&instrument__currency__exact=USD)"', html
    )
    listed = admin_client.get(link.group(1)).context["cl"].result_list
    assert {p.instrument.symbol for p in listed} == {"AAPL", "TSLA", "ES"}


def test_no_positions_yet(admin_client):
    html = overview(admin_client).text

    assert "No open positions." in html
    assert "No successful IBKR sync yet." in html


@pytest.mark.parametrize("rows", [3, 90])
def test_queries_do_not_grow_with_positions(admin_client, django_assert_max_num_queries, rows):
    accounts = ("U1111111", "U2222222", "U3333333")
    currencies = ("USD", "EUR", "CHF")
    sync(
        FakeGateway(
            accounts=accounts,
            positions=[
                position(account=accounts[i % 3], con_id=1000 + i, symbol=f"S{i:03}",
                         currency=currencies[i // 30 % 3])
                for i in range(rows)
            ],
        )
    )  # fmt: skip
    overview(admin_client)  # warm the session and content-type caches

    with django_assert_max_num_queries(OVERVIEW_MAX_QUERIES):
        data = overview(admin_client).context["overview"]

    assert data.positions == rows


# --- the last sync -------------------------------------------------------------------------


def test_last_successful_sync_and_its_age(admin_client, portfolio):
    SyncRun.objects.filter(pk=portfolio.pk).update(
        finished_at=timezone.now() - dt.timedelta(hours=3, minutes=5)
    )

    html = overview(admin_client).text

    assert re.search(
        rf'Last successful IBKR sync: <a href="[^"]+/{portfolio.pk}/change/">#{portfolio.pk}</a>',
        html,
    )
    assert '<span class="ibkr-sync-age">3\xa0hours, 5\xa0minutes ago</span>' in html
    assert 'class="warning"' not in html


def test_a_sync_that_just_finished(admin_client, portfolio):
    html = overview(admin_client).text

    assert '<span class="ibkr-sync-age">less than a minute ago</span>' in html


def test_a_warning_when_the_latest_sync_failed(admin_client, portfolio, gateway):
    gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at 127.0.0.1:4002")
    with pytest.raises(GatewayUnavailable):
        sync(gateway)
    failed = SyncRun.objects.get(status="failed")

    html = overview(admin_client).text

    warning = re.search(r'<li class="warning">(.*?)</li>', html, re.S).group(1)
    assert f"#{failed.pk}</a>" in warning
    assert "failed: Cannot connect to the IB gateway at 127.0.0.1:4002" in warning
    assert "The figures below are as of the last successful sync." in warning
    assert (
        f'Last successful IBKR sync: <a href="/admin/ibkr_sync/syncrun/{portfolio.pk}/change/">'
        in html
    )


def test_a_sync_refused_because_another_ran_is_no_failure(admin_client, portfolio, gateway):
    """As for GET /healthz: a refused concurrent attempt says nothing about the data."""
    running = SyncRun.objects.create(trigger="command", status=SyncRun.Status.RUNNING)
    with pytest.raises(SyncAlreadyRunning):
        sync(gateway)
    running.delete()  # the other sync is gone; the refusal is the latest finished run
    refused = SyncRun.objects.get(status="failed")
    assert refused.error_code == "sync_already_running"

    html = overview(admin_client).text

    assert 'class="warning"' not in html
    assert f"#{portfolio.pk}</a>" in html


def test_a_running_sync_does_not_hide_the_last_result(admin_client, portfolio):
    SyncRun.objects.create(trigger="command", status=SyncRun.Status.RUNNING)

    html = overview(admin_client).text

    assert f"#{portfolio.pk}</a>" in html
    assert 'class="warning"' not in html


# --- access --------------------------------------------------------------------------------


def test_linked_from_the_admin_index(admin_client):
    html = admin_client.get(reverse("admin:index")).text

    assert f'<a href="{OVERVIEW}">Portfolio overview</a>' in html


def test_only_for_users_who_may_view_positions(django_user_model, client):
    staff = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    staff_client = client_for(staff)

    assert staff_client.get(OVERVIEW).status_code == 403
    assert OVERVIEW not in staff_client.get(reverse("admin:index")).text

    staff.user_permissions.add(Permission.objects.get(codename="view_position"))
    assert client_for(staff).get(OVERVIEW).status_code == 200

    anonymous = client.get(OVERVIEW)
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))
