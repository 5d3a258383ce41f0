"""Activity Flex statements of our own, in the real format (IBKR's Flex Query reference:
OpenPositions, CashReport, EquitySummaryInBase, ConversionRates), for the sync's tests."""

from __future__ import annotations

import datetime as dt
from xml.sax.saxutils import quoteattr


def _row(tag: str, **attributes: str) -> str:
    return f"<{tag} " + " ".join(f"{k}={quoteattr(v)}" for k, v in attributes.items()) + " />"


def statement_with_values(
    from_date: dt.date | None,
    to_date: dt.date | None,
    *,
    account: str = "U7654321",
    sections: tuple[str, ...] = (
        "OpenPositions",
        "CashReport",
        "EquitySummaryInBase",
        "ConversionRates",
    ),
    quantity: str = "120",
) -> str:
    """One account in USD: Apple (USD) and SAP (EUR), cash in USD, EUR and a total,
    the net asset value of each day, and EUR/CHF rates of the last two days."""
    to_date = to_date or dt.date(2026, 3, 13)
    from_date = from_date or to_date
    last, before = to_date, to_date - dt.timedelta(days=1)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<FlexQueryResponse queryName="Portfolio" type="AF">',
        '<FlexStatements count="1">',
        f'<FlexStatement accountId="{account}" fromDate="{from_date:%Y%m%d}" '
        f'toDate="{to_date:%Y%m%d}" period="" whenGenerated="{to_date:%Y%m%d};073012">',
        _row(
            "AccountInformation",
            accountId=account,
            currency="USD",
            name="Flex Test",
            accountType="Individual",
        ),
    ]
    if "OpenPositions" in sections:
        parts += [
            "<OpenPositions>",
            _row(
                "OpenPosition",
                accountId=account,
                currency="USD",
                fxRateToBase="1",
                assetCategory="STK",
                symbol="AAPL",
                description="APPLE INC",
                conid="265598",
                listingExchange="NASDAQ",
                multiplier="1",
                reportDate=f"{last:%Y%m%d}",
                position=quantity,
                markPrice="213.49",
                positionValue="25618.8",
                costBasisPrice="150.123456",
                costBasisMoney="18014.81472",
                fifoPnlUnrealized="7603.98528",
                side="Long",
                levelOfDetail="SUMMARY",
            ),
            _row(
                "OpenPosition",
                accountId=account,
                currency="EUR",
                fxRateToBase="1.0871",
                assetCategory="STK",
                symbol="SAP",
                description="SAP SE",
                conid="14204",
                listingExchange="IBIS",
                multiplier="1",
                reportDate=f"{last:%Y%m%d}",
                position="-15",
                markPrice="240.1",
                positionValue="-3601.5",
                costBasisPrice="251",
                costBasisMoney="-3765",
                fifoPnlUnrealized="163.5",
                side="Short",
                levelOfDetail="SUMMARY",
            ),
            "</OpenPositions>",
        ]
    if "CashReport" in sections:
        parts += [
            "<CashReport>",
            _row(
                "CashReportCurrency",
                accountId=account,
                currency="BASE_SUMMARY",
                endingCash="13912.345",
                endingSettledCash="13912.345",
                levelOfDetail="BaseCurrency",
            ),
            _row(
                "CashReportCurrency",
                accountId=account,
                currency="USD",
                endingCash="12000.5",
                endingSettledCash="12000.5",
                levelOfDetail="Currency",
            ),
            _row(
                "CashReportCurrency",
                accountId=account,
                currency="EUR",
                endingCash="1758.75",
                endingSettledCash="1758.75",
                levelOfDetail="Currency",
            ),
            "</CashReport>",
        ]
    if "EquitySummaryInBase" in sections:
        parts.append("<EquitySummaryInBase>")
        day = from_date
        n = 0
        while day <= to_date:
            parts.append(
                _row(
                    "EquitySummaryByReportDateInBase",
                    accountId=account,
                    currency="USD",
                    reportDate=f"{day:%Y%m%d}",
                    cash=f"{13900 + n}.345",
                    stock=f"{21900 + n}.1",
                    total=f"{35800 + n}.445",
                )
            )
            day += dt.timedelta(days=1)
            n += 1
        parts.append("</EquitySummaryInBase>")
    if "ConversionRates" in sections:
        parts.append("<ConversionRates>")
        for day, eur, chf in ((before, "1.0802", "1.1301"), (last, "1.0871", "1.1345")):
            for currency, rate in (("EUR", eur), ("CHF", chf)):
                parts.append(
                    _row(
                        "ConversionRate",
                        reportDate=f"{day:%Y%m%d}",
                        fromCurrency=currency,
                        toCurrency="USD",
                        rate=rate,
                    )
                )
        parts.append("</ConversionRates>")
    parts += ["</FlexStatement>", "</FlexStatements>", "</FlexQueryResponse>", ""]
    return "\n".join(parts)
