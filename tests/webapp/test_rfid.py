"""RFID charging cards: linked on the account page, then a charger's Authorize/StartTransaction with the card pays from the wallet."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D

from sqlalchemy import select

from payments.base import utcnow
from payments.ledger import AccountKind
from tests.webapp.test_charging_service import driver, event, make_site, money, session
from tests.webapp.wallet_helpers import sign_in, text
from webapp.charging import service
from webapp.charging.models import PaymentKind, RfidTag, SessionState


def tags(app) -> list[tuple[str, int]]:
    with app.extensions["db_sessionmaker"]() as s:
        return [(t.id_tag, t.user_id) for t in s.scalars(select(RfidTag).order_by(RfidTag.id))]


def only_tag_id(app) -> int:
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalar(select(RfidTag.id))


def test_a_card_is_linked_normalised_and_removed(app, client, make_user):
    ana = make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    r = client.post("/account/rfid-tags", data={"id_tag": "04 a1-b2:c3", "label": "Blue card"})
    assert r.status_code == 302
    assert tags(app) == [("04A1B2C3", ana.id)]
    page = text(client.get("/account/"))
    assert "04A1B2C3" in page and "Blue card" in page
    tag_id = only_tag_id(app)
    assert client.post(f"/account/rfid-tags/{tag_id}/remove").status_code == 302
    assert tags(app) == []


def test_bad_and_taken_card_numbers_are_refused_with_a_reason(app, client, make_user):
    make_user("ana@example.com")
    ben = make_user("ben@example.com")
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(RfidTag(id_tag="CAFE0001", user_id=ben.id))
    sign_in(client, "ana@example.com")
    r = client.post("/account/rfid-tags", data={"id_tag": "a!", "label": ""})
    assert r.status_code == 400 and "4 to 20 letters and digits" in text(r)
    r = client.post("/account/rfid-tags", data={"id_tag": "cafe0001", "label": ""})
    assert r.status_code == 400 and "already linked to an account" in text(r)
    r = client.post("/account/rfid-tags", data={"id_tag": "", "label": ""})
    assert r.status_code == 400 and "Enter the number printed on the card" in text(r)
    ben_tag = only_tag_id(app)
    assert client.post(f"/account/rfid-tags/{ben_tag}/remove").status_code == 404  # not hers
    assert tags(app) == [("CAFE0001", ben.id)]


def test_charging_with_a_linked_card_pays_from_the_wallet(app):
    make_site(app)
    ana = driver(app, euros=5)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(RfidTag(id_tag="CAFE0002", user_id=ana.id))
    assert event(app, lambda s, ch, now: _authorize(s, ch, "CAFE0002", now)) == "Accepted"
    assert event(app, lambda s, ch, now: _authorize(s, ch, "UNKNOWN1", now)) == "Invalid"
    t0 = utcnow()
    ans = event(app, service.start_transaction, connector_number=1, id_tag="CAFE0002", meter_start_wh=D(0), timestamp=t0, now=t0)
    assert ans.id_tag_status == "Accepted"
    cs = session(app, ans.transaction_id)
    # €5 in the wallet is less than the default hold: the hold is what the wallet has (or a little less), and the session stops there
    assert cs.state == SessionState.CHARGING and cs.via_rfid and cs.payment_kind == PaymentKind.WALLET and 0 < cs.hold_minor <= 500
    event(app, service.stop_transaction, transaction_id=cs.id, meter_stop_wh=D(4000), timestamp=t0 + dt.timedelta(minutes=20),
          reason="Local", readings=[])
    done = session(app, cs.id)
    assert done.state == SessionState.COMPLETED and done.captured_minor == 169  # 4 kWh × 0.4235
    assert money(app, ana.owner) == 500 - 169 and money(app, ana.owner, AccountKind.WALLET_HOLD) == 0


def test_an_empty_wallet_or_blocked_card_is_refused_at_the_charger(app):
    make_site(app)
    ana = driver(app, euros=0)
    ben = driver(app, "ben@example.com", euros=20)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add_all([RfidTag(id_tag="EMPTY001", user_id=ana.id), RfidTag(id_tag="BLOCK001", user_id=ben.id, blocked=True)])
    for tag in ("EMPTY001", "BLOCK001"):
        assert event(app, lambda s, ch, now, tag=tag: _authorize(s, ch, tag, now)) == "Blocked"
        ans = event(app, service.start_transaction, connector_number=1, id_tag=tag, meter_start_wh=D(0), timestamp=utcnow())
        assert ans.id_tag_status == "Blocked" and ans.transaction_id == 0
    assert money(app, ben.owner) == 2000


def _authorize(s, charger, tag, now):
    return service.authorize(s, charger, tag, now)
