"""Pages of receipts, invoices and credit notes; the buyer's billing details; the operator's branding.

Who may see a document: the signed-in account that owns it (``owner`` is
``user:<id>``), or a guest holding the link token of the charging session it
was issued for (``?t=`` on the emailed link, or remembered in this browser's
Flask session like on the session page). Anyone else gets the same 404 as for
a number that does not exist. The public check page (``/documents/check/<token>``,
the QR code's target) shows nothing personal: number, seller, date, total and
whether the document still stands.

Pages send no inline style (CSP): the operator's colour comes as a tiny
stylesheet per colour (``/documents/theme/<rrggbb>.css``) and the logo from
``/operators/<id>/logo``; the PDF embeds both (``webapp.receipts.render``).
"""

from __future__ import annotations

import hmac

import io
import re
import xml.etree.ElementTree as ET

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.routing import BaseConverter
from wtforms import BooleanField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, Regexp, ValidationError

from payments.invoicing import Document, DocumentKind, DocumentSeries, InvoiceError
from webapp.charging import service as charging
from webapp.charging.models import ChargingSession
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.models import Operator, Role
from webapp.receipts import render
from webapp.receipts import service as receipts
from webapp.receipts.models import BillingDetails

bp = Blueprint("receipts", __name__)

GUEST_TOKENS = "charging_guest_tokens"  # the charging pages' remembered guest link tokens (webapp.charging.views)
NUMBER = r"[A-Z0-9]{1,24}(?:-[A-Z0-9]{1,24}){1,4}"  # VP-2026-000123, VP-CN-2026-000004
COLOR = re.compile(r"#[0-9a-f]{6}")
PREFIX = re.compile(r"[A-Z0-9]{2,8}")
LOGO_MAX = 200 * 1024
LOGO_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


class DocumentNumberConverter(BaseConverter):
    """A document number: upper-case letters and digits in dash-separated groups (no dot, so ``.pdf`` stays its own route)."""

    regex = NUMBER


bp.record_once(lambda state: state.app.url_map.converters.setdefault("docnumber", DocumentNumberConverter))


# --------------------------------------------------------------------------- forms


def _upper_compact(value: str | None) -> str:
    return re.sub(r"[\s.\-]", "", value or "").upper()


def _strip(value: str | None) -> str:
    return (value or "").strip()


def valid_vat_id(form, field) -> None:
    """A VAT or tax id: 4–20 letters and digits with at least one digit (EU ``ESB12345678``, a Chinese 18-character code...)."""
    value = field.data or ""
    if value and (not re.fullmatch(r"[A-Z0-9]{4,20}", value) or not re.search(r"[0-9]", value)):
        raise ValidationError(_l("Enter the VAT number as printed, for example ESB12345678 (letters and digits only)."))


class BusinessDetailsForm(FlaskForm):
    """The buyer's company on an invoice: name, address, VAT number."""

    company_name = StringField(_l("Company name"), filters=[_strip],
                               validators=[DataRequired(message=_l("Enter the company's name.")),
                                           Length(max=200, message=_l("At most 200 characters."))],
                               render_kw={"autocomplete": "organization"})
    address = TextAreaField(_l("Company address"), filters=[_strip],
                            validators=[DataRequired(message=_l("Enter the company's address.")),
                                        Length(max=500, message=_l("At most 500 characters."))],
                            render_kw={"autocomplete": "street-address", "rows": 3})
    vat_id = StringField(_l("VAT number"), filters=[_upper_compact], validators=[Optional(), valid_vat_id],
                         description=_l("Optional. With the country code, for example ESB12345678."),
                         render_kw={"autocomplete": "off", "autocapitalize": "characters"})


class BillingDetailsForm(BusinessDetailsForm):
    """The account's business details for future invoices (all empty: none)."""

    company_name = StringField(_l("Company name"), filters=[_strip], validators=[Length(max=200, message=_l("At most 200 characters."))],
                               render_kw={"autocomplete": "organization"})
    address = TextAreaField(_l("Company address"), filters=[_strip], validators=[Length(max=500, message=_l("At most 500 characters."))],
                            render_kw={"autocomplete": "street-address", "rows": 3})

    def validate_company_name(self, field) -> None:
        """A VAT number or an address belongs to a company: name it."""
        if not field.data and (self.vat_id.data or self.address.data):
            raise ValidationError(_l("Enter the company's name, or clear the other fields."))


class BrandingForm(FlaskForm):
    """An operator's look on documents: colour, logo, footer, legal lines, number prefix."""

    color = StringField(_l("Colour"), filters=[lambda v: _strip(v).lower()],
                        validators=[DataRequired(message=_l("Choose a colour.")),
                                    Regexp(COLOR.pattern + "$", message=_l("Enter a colour as #rrggbb, for example #0b6e4f."))],
                        render_kw={"type": "color"})
    logo = FileField(_l("Logo"), description=_l("PNG, JPEG or SVG, at most 200 kB."))
    remove_logo = BooleanField(_l("Remove the logo"))
    footer = TextAreaField(_l("Footer text"), filters=[_strip], validators=[Length(max=500, message=_l("At most 500 characters."))],
                           render_kw={"rows": 2})
    legal = TextAreaField(_l("Legal lines"), filters=[_strip], validators=[Length(max=1000, message=_l("At most 1000 characters."))],
                          description=_l("One per line: registration, share capital, registered office…"), render_kw={"rows": 3})
    prefix = StringField(_l("Document number prefix"), filters=[_upper_compact],
                         validators=[Optional(), Regexp(PREFIX.pattern + "$", message=_l("Use 2 to 8 capital letters and digits, for example VP."))],
                         description=_l("Invoices are numbered PREFIX-YEAR-000123. A new prefix is used from the next series (the next year)."))


def logo_type(data: bytes) -> str | None:
    """The media type of an uploaded logo judged by its content (PNG, JPEG or a script-free SVG), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None
        return {"PNG": "image/png", "JPEG": "image/jpeg"}.get(fmt or "")
    return "image/svg+xml" if _safe_svg(data) else None


def _safe_svg(data: bytes) -> bool:
    """An SVG document without DTD, script, event handler, foreign content or external reference."""
    head = data[:2048].lower()
    if b"<!doctype" in data.lower() or b"<!entity" in data.lower() or b"<svg" not in head:
        return False
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return False
    if root.tag != "{http://www.w3.org/2000/svg}svg":
        return False
    for el in root.iter():
        name = el.tag.rsplit("}", 1)[-1].lower() if isinstance(el.tag, str) else ""
        if name in ("script", "foreignobject", "iframe", "embed", "object"):
            return False
        for attr, value in el.attrib.items():
            a = attr.rsplit("}", 1)[-1].lower()
            if a.startswith("on"):
                return False
            if a == "href" and not (value.startswith("#") or value.startswith("data:image/")):
                return False
            if "url(" in value and "url(#" not in value.replace(" ", ""):
                return False
    return True


# --------------------------------------------------------------------------- access


def _user():
    return current_user if current_user.is_authenticated else None


def _remembered(session_id: int) -> str | None:
    tokens = session.get(GUEST_TOKENS)
    return tokens.get(str(session_id)) if isinstance(tokens, dict) else None


def _charging_session(doc: Document) -> ChargingSession | None:
    kind, _sep, ref = doc.source.partition(":")
    if kind != "session" or not ref.isdigit():
        return None
    return db_session().get(ChargingSession, int(ref))


LINKED = "documents_by_link"  # ids of documents this browser opened with their emailed link (``?k=``)


def opened_by_link(doc: Document) -> bool:
    """This browser opened the document with its own link (the receipt email's, or its QR code's): it may read it."""
    return doc.id in session.get(LINKED, [])


def may_see(doc: Document | None, token: str | None = None) -> bool:
    """Whoever may read it: its owner, or a holder of its own link (``may_act`` says who may also reissue it)."""
    return doc is not None and (may_act(doc, token) or opened_by_link(doc))


def may_act(doc: Document | None, token: str | None = None) -> bool:
    """The owner signed in, or the holder of the guest link token of the document's charging session."""
    if doc is None:
        return False
    user = _user()
    if user is not None and doc.owner == user.owner:
        return True
    if doc.owner.startswith("guest:"):
        cs = _charging_session(doc)
        if cs is not None and cs.owner == doc.owner:
            return charging.visible_to(cs, user=None, guest_token=token or _remembered(cs.id))
    return False


def _own_document(number: str, token: str | None = None, *, act: bool = False) -> Document:
    doc = db_session().scalar(select(Document).where(Document.number == number))
    if not (may_act(doc, token) if act else may_see(doc, token)):
        abort(404)
    return doc


def _reissuable(s, doc: Document) -> bool:
    return doc.kind is not DocumentKind.CREDIT_NOTE and render.status_of(s, doc)["code"] in ("valid", "partly_credited")


def _document_page(doc: Document, form: BusinessDetailsForm | None = None, status_code: int = 200):
    s = db_session()
    status = render.status_of(s, doc)
    cs = _charging_session(doc)
    html = render.render_html(
        doc,
        status=status,
        pdf_url=url_for("receipts.document_pdf", number=doc.number),
        session_url=url_for("charging.session_page", session_id=cs.id) if cs is not None else None,
        reissue_form=(form or BusinessDetailsForm()) if _reissuable(s, doc) and may_act(doc) else None,
        reissue_url=url_for("receipts.reissue", number=doc.number),
        status_text=render.status_text,  # called in the template, in the document's language
    )
    return Response(html, status=status_code, mimetype="text/html")


# --------------------------------------------------------------------------- documents


@bp.route("/documents/<docnumber:number>")
def document_page(number: str):
    """A document as a page, in its own language, with its PDF link (and the business-invoice form while it can be reissued)."""
    key = request.args.get("k")
    if key is not None:  # the receipt email's link: read-only access for this browser (a guest has no account)
        doc = db_session().scalar(select(Document).where(Document.number == number))
        if doc is None or not hmac.compare_digest(key[:64].encode(), doc.verify_token.encode()):
            abort(404)
        session[LINKED] = [*session.get(LINKED, [])[-49:], doc.id]
        return redirect(url_for("receipts.document_page", number=number))
    token = request.args.get("t")
    if token is not None:
        doc = _own_document(number, token[:200])
        cs = _charging_session(doc)
        if cs is not None and doc.owner.startswith("guest:"):
            from webapp.charging.views import remember_guest_token

            remember_guest_token(cs.id, token[:200])
        # The token leaves the address bar (history, Referer): this browser remembers it instead.
        return redirect(url_for("receipts.document_page", number=number))
    return _document_page(_own_document(number))


@bp.route("/documents/<docnumber:number>.pdf")
def document_pdf(number: str):
    """The document as a PDF (A4), in its own language."""
    token = request.args.get("t")
    doc = _own_document(number, token[:200] if token else None)
    pdf = render.render_pdf(db_session(), doc)
    resp = Response(pdf, mimetype="application/pdf")
    resp.headers["Content-Disposition"] = f'inline; filename="{doc.number}.pdf"'
    return resp


def refusal(e: InvoiceError) -> Problem:
    """Why a document cannot be reissued, as a 409 a person can read."""
    messages = {
        "already_reissued": _("This document was already reissued with business details."),
        "fully_credited": _("This document was refunded in full: there is nothing left to invoice."),
        "not_reissuable": _("A credit note cannot be reissued."),
    }
    return Problem(409, e.code, messages.get(e.code, _("This document cannot be reissued.")))


@bp.route("/documents/<docnumber:number>/business", methods=["POST"])
def reissue(number: str):
    """After payment: cancel the document with a credit note and issue it again with the buyer's company details."""
    doc = _own_document(number, act=True)  # the buyer, not whoever holds a copy of the receipt
    s = db_session()
    if doc.kind is DocumentKind.CREDIT_NOTE:
        raise refusal(InvoiceError("credit note", "not_reissuable"))
    form = BusinessDetailsForm()
    if not form.validate_on_submit():
        return _document_page(doc, form, 400 if form.errors else 200)
    buyer = {k: v for k, v in (("company_name", form.company_name.data), ("address", form.address.data),
                                ("vat_id", form.vat_id.data)) if v}
    try:
        _cn, new = receipts.reissue_for_business(s, doc, buyer, now=utcnow())
        s.commit()
    except InvoiceError as e:
        s.rollback()
        raise refusal(e) from None
    except IntegrityError:  # the same request twice at once: the first one won
        s.rollback()
        raise refusal(InvoiceError("already reissued", "already_reissued")) from None
    flash(_("Your invoice %(number)s was issued with your company's details.", number=new.number), "success")
    return redirect(url_for("receipts.document_page", number=new.number))


@bp.route("/documents/check/<string(maxlength=64):verify_token>")
def check(verify_token: str):
    """The QR code's target: does this document exist, and does it still stand? Nothing personal is shown."""
    s = db_session()
    doc = s.scalar(select(Document).where(Document.verify_token == verify_token))
    if doc is None:
        abort(404)
    from flask_babel import get_locale

    content = render.loads(doc.content)
    status = render.status_of(s, doc)
    locale = str(get_locale() or "en")
    tz = render.zone(content.get("time_zone"))
    sign = -1 if doc.kind is DocumentKind.CREDIT_NOTE else 1
    facts = {
        "title": render.title_of(doc, content),
        "seller": content.get("seller") or {},
        "issued": render.day(doc.issued_at, tz, locale),
        "total": render.format_money(render.Money(sign * doc.total_minor, doc.currency), locale),
        "original": (content.get("original") or {}).get("number"),
    }
    resp = Response(render_template("documents/check.html", doc=doc, f=facts, status=status, status_text=render.status_text(status)))
    resp.headers["X-Robots-Tag"] = "noindex"
    return resp


@bp.route("/documents/theme/<color>.css")
def theme(color: str):
    """The operator colour of a document page as a stylesheet (the CSP allows no inline style)."""
    if not COLOR.fullmatch("#" + color):
        abort(404)
    resp = Response(f".document {{ --doc-brand: #{color}; }}\n", mimetype="text/css")
    resp.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    return resp


@bp.route("/operators/<int(max=2147483647):operator_id>/logo")
def operator_logo(operator_id: int):
    """An operator's logo (public: it is printed on every document they issue)."""
    op = db_session().get(Operator, operator_id)
    if op is None or not op.brand_logo or op.brand_logo_type not in LOGO_TYPES:
        abort(404)
    resp = Response(op.brand_logo, mimetype=op.brand_logo_type)
    resp.headers["Cache-Control"] = "public, max-age=300"
    # An SVG opened on its own must not run anything (it was checked for scripts on upload too).
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    return resp


@bp.app_template_global()
def session_document_url(cs) -> str | None:
    """The page of a charging session's invoice (the latest: a reissue replaces the first), or None."""
    doc = receipts.document_for(db_session(), f"session:{cs.id}")
    return url_for("receipts.document_page", number=doc.number) if doc is not None else None


# --------------------------------------------------------------------------- billing details


@bp.route("/account/billing", methods=["GET", "POST"])
@login_required
def billing():
    """The account's company details, printed on the invoices issued from now on."""
    s = db_session()
    row = s.get(BillingDetails, current_user.id)
    form = BillingDetailsForm(obj=row) if request.method == "GET" else BillingDetailsForm()
    if form.validate_on_submit():
        if row is None:
            row = BillingDetails(user_id=current_user.id)
            s.add(row)
        row.company_name, row.address, row.vat_id = form.company_name.data, form.address.data, form.vat_id.data
        s.commit()
        flash(_("Your billing details were saved. They appear on the invoices of your next payments."), "success")
        return redirect(url_for("receipts.billing"))
    return render_template("account/billing.html", form=form), 400 if form.errors else 200


# --------------------------------------------------------------------------- operator branding


def _branded_operator() -> Operator:
    """The operator whose branding this person may edit: staff their own; an admin the one named by ``?operator=`` (else the first)."""
    if not current_user.is_authenticated:
        abort(404)
    s = db_session()
    if current_user.role == Role.ADMIN:
        wanted = request.args.get("operator", "")
        op = s.get(Operator, int(wanted)) if wanted.isdigit() and len(wanted) < 10 else s.scalar(select(Operator).order_by(Operator.id).limit(1))
    elif current_user.role == Role.OPERATOR_STAFF and current_user.operator_id:
        op = s.get(Operator, current_user.operator_id)
    else:
        abort(403)
    if op is None:
        abort(404)
    return op


def _prefix_error(s, op: Operator, prefix: str) -> str | None:
    """Why ``prefix`` cannot be this operator's (it would make two documents share a number), or None."""
    if not prefix or prefix == op.prefix:
        return None
    taken = s.scalar(select(Operator.id).where(Operator.document_prefix == prefix, Operator.id != op.id))
    platform = str(current_app.config.get("PLATFORM_DOCUMENT_PREFIX", "VPW"))
    in_series = s.scalar(select(DocumentSeries.id).where(DocumentSeries.prefix.in_([prefix, f"{prefix}-CN"]),
                                                         DocumentSeries.scope != f"operator:{op.id}").limit(1))
    if taken or in_series or prefix == platform or (re.fullmatch(r"OP[0-9]+", prefix) and prefix != f"OP{op.id}"):
        return _("This prefix is already used by another seller. Choose another one.")
    return None


def _branding_page(op: Operator, form: BrandingForm, status: int = 200):
    from flask_babel import get_locale

    sample, content = render.sample_document(op, str(get_locale() or "en"), utcnow())
    with_logo = url_for("receipts.operator_logo", operator_id=op.id) if op.brand_logo else ""
    view = render.view_of(sample, content)
    return render_template("operator/branding.html", form=form, op=op, v=view, doc=sample, qr=render.qr_svg(sample),
                           check_url=render.check_url(sample), logo_src=with_logo,
                           preview_pdf=url_for("receipts.branding_preview", **_admin_arg(op))), status


def _admin_arg(op: Operator) -> dict:
    return {"operator": op.id} if current_user.role == Role.ADMIN else {}


@bp.route("/operator/branding", methods=["GET", "POST"])
@login_required
def branding():
    """Operator staff: how their receipts and invoices look, with a preview of a sample invoice."""
    op = _branded_operator()
    s = db_session()
    if request.method == "GET":
        form = BrandingForm(data={"color": op.brand_color, "footer": op.receipt_footer, "legal": op.receipt_legal,
                                  "prefix": op.document_prefix or ""})
        return _branding_page(op, form)
    form = BrandingForm()
    valid = form.validate_on_submit()
    logo = None
    upload = form.logo.data
    if upload is not None and getattr(upload, "filename", ""):
        data = upload.read(LOGO_MAX + 1)
        if len(data) > LOGO_MAX:
            form.logo.errors = [_("The logo is larger than 200 kB. Make it smaller and try again.")]
            valid = False
        elif not data:
            form.logo.errors = [_("The file is empty.")]
            valid = False
        else:
            kind = logo_type(data)
            if kind is None:
                form.logo.errors = [_("Upload a PNG, JPEG or SVG image (SVG without scripts or links).")]
                valid = False
            else:
                logo = (data, kind)
    prefix_problem = _prefix_error(s, op, form.prefix.data or "") if form.prefix.data and not form.prefix.errors else None
    if prefix_problem:
        form.prefix.errors = [prefix_problem]
        valid = False
    if not valid:
        return _branding_page(op, form, 400)
    op.brand_color = form.color.data
    op.receipt_footer = form.footer.data
    op.receipt_legal = form.legal.data
    if form.prefix.data and form.prefix.data != op.prefix:
        op.document_prefix = form.prefix.data
    if logo is not None:
        op.brand_logo, op.brand_logo_type = logo
    elif form.remove_logo.data:
        op.brand_logo = op.brand_logo_type = None
    try:
        s.commit()
    except IntegrityError:  # another operator took the prefix at the same moment
        s.rollback()
        form.prefix.errors = [_("This prefix is already used by another seller. Choose another one.")]
        return _branding_page(s.get(Operator, op.id), form, 400)
    flash(_("Saved. Documents issued from now on look like the preview."), "success")
    return redirect(url_for("receipts.branding", **_admin_arg(op)))


@bp.route("/operator/branding/preview.pdf")
@login_required
def branding_preview():
    """The sample invoice as a PDF with the saved branding."""
    from flask_babel import get_locale

    op = _branded_operator()
    sample, content = render.sample_document(op, str(get_locale() or "en"), utcnow())
    resp = Response(render.render_pdf(db_session(), sample, content=content), mimetype="application/pdf")
    resp.headers["Content-Disposition"] = 'inline; filename="preview.pdf"'
    return resp
