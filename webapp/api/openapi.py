"""The OpenAPI 3.1 document of ``/api/v1``; CI checks the running API against it with schemathesis."""

from __future__ import annotations

from flask import current_app


def _problem(description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if headers:
        out["headers"] = headers
    return out


def _json(schema_ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}}


HEADERS = {
    "WWW-Authenticate": {
        "description": "The bearer challenge (RFC 6750)",
        "required": True,
        "schema": {"type": "string", "pattern": "^Bearer "},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
}


def _unauthorized(description: str) -> dict:
    return _problem(description, {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}})


COMMON_ERRORS = {
    "401": _unauthorized("Missing or malformed Authorization header (`unauthenticated`); unknown, revoked or expired token (`invalid_token`)"),
}

# Text fields are stored or hashed as UTF-8 text; a NUL character is refused with 422.
NO_NUL = "^[^\\x00]*$"

SCHEMAS = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details; `code` is stable and meant for programs.",
        "required": ["type", "title", "status", "code", "detail"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "code": {"type": "string", "pattern": "^[a-z][a-z_]*$"},
            "detail": {"type": "string"},
            "errors": {"type": "object", "description": "Field name → what is wrong with it", "additionalProperties": {"type": "string"}},
            "request_id": {"type": "string"},
            # Extension members of some problems (documented with the operations that return them).
            "decline_reason": {"type": "string", "description": "`card_declined`: the bank's decline code when known, else `generic_decline`"},
            "top_up_id": {"type": "integer", "minimum": 1, "description": "The top-up this answer is about; see GET /wallet/top-ups/{top_up_id}"},
            "minimum": {"$ref": "#/components/schemas/Money"},
            "maximum": {"$ref": "#/components/schemas/Money"},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$",
                         "description": "`wrong_currency`: the wallet's currency; `cap_currency`, `wallet_currency`: the charger's currency"},
            "session_id": {"type": "integer", "minimum": 1,
                           "description": "The charging session this answer is about (it exists; see GET /sessions/{session_id})"},
            "refusal": {"enum": ["postpaid", "no_tenant", "not_a_tenant_meter"],
                        "description": "`meter_not_payable`: why the meter takes no top-up"},
            "balance": {"$ref": "#/components/schemas/Money", "description": "`wallet_insufficient`: what the wallet holds"},
            "session_token": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$",
                              "description": "A guest's session token, in the answer that created the session (send it as X-Session-Token)"},
        },
    },
    "TokenRequest": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {
            "email": {"type": "string", "format": "email", "minLength": 1},
            "password": {"type": "string", "minLength": 1, "pattern": NO_NUL},
            "totp_code": {"type": "string", "pattern": NO_NUL, "description": "Authenticator code or recovery code, when two-factor sign-in is on"},
            "name": {"type": "string", "maxLength": 100, "pattern": NO_NUL, "description": "A label to recognise the token later"},
        },
    },
    "Token": {
        "type": "object",
        "required": ["id", "name", "created_at", "expires_at", "last_used_at"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "name": {"type": "string", "maxLength": 100},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": "string", "format": "date-time"},
            "last_used_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "IssuedToken": {
        "allOf": [
            {"$ref": "#/components/schemas/Token"},
            {
                "type": "object",
                "required": ["access_token", "token_type"],
                "properties": {"access_token": {"type": "string", "pattern": "^vp_"}, "token_type": {"const": "Bearer"}},
            },
        ],
        "unevaluatedProperties": False,
    },
    "TokenList": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "array",
                "description": "Never carries the secrets: a token is shown only when issued",
                "items": {"$ref": "#/components/schemas/Token", "unevaluatedProperties": False},
            }
        },
    },
    "Me": {
        "type": "object",
        "required": ["id", "email", "role", "locale", "email_verified", "two_factor_enabled", "created_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "email": {"type": "string"},
            "role": {"enum": ["customer", "support", "operator_staff", "admin"]},
            "locale": {"type": ["string", "null"], "enum": ["en", "es", "zh", None]},
            "email_verified": {"type": "boolean"},
            "two_factor_enabled": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
}


# --- wallet and payment methods ----------------------------------------------------------------

PM_ID = "^pm_[A-Za-z0-9_]{1,252}$"
MAX_ID = 2147483647

WALLET_SCHEMAS = {
    "Money": {
        "type": "object",
        "description": "An amount in integer minor units (cents; yen for JPY) and its ISO 4217 currency. Never a decimal.",
        "required": ["amount", "currency"],
        "additionalProperties": False,
        "properties": {
            "amount": {"type": "integer", "description": "Minor units: 1234 EUR is €12.34"},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code in capitals"},
        },
    },
    "Wallet": {
        "type": "object",
        "required": ["balance", "held", "currency", "top_up"],
        "additionalProperties": False,
        "properties": {
            "balance": {"$ref": "#/components/schemas/Money", "description": "What can be spent (holds excluded)"},
            "held": {"$ref": "#/components/schemas/Money", "description": "Reserved for charging sessions in progress"},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "top_up": {
                "type": "object",
                "description": "What one top-up may be, and the amounts to offer as buttons",
                "required": ["minimum", "maximum", "presets"],
                "additionalProperties": False,
                "properties": {
                    "minimum": {"$ref": "#/components/schemas/Money"},
                    "maximum": {"$ref": "#/components/schemas/Money"},
                    "presets": {"type": "array", "items": {"$ref": "#/components/schemas/Money"}},
                },
            },
        },
    },
    "TopUpRequest": {
        "type": "object",
        "required": ["amount", "payment_method_id"],
        "properties": {
            "amount": {"$ref": "#/components/schemas/Money", "description": "In the wallet's currency, within GET /wallet `top_up` limits"},
            "payment_method_id": {"type": "string", "pattern": PM_ID, "description": "One of the account's saved cards (GET /payment-methods)"},
        },
    },
    "TopUp": {
        "type": "object",
        "required": ["id", "state", "amount", "card", "created_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "state": {
                "enum": ["created", "requires_action", "processing", "authorized", "succeeded", "failed", "canceled"],
                "description": "`succeeded`: the wallet is credited. `requires_action`: confirm 3-D Secure with `client_secret` "
                "(stripe.js `confirmCardPayment` or the mobile SDK), then POST .../confirm. `created`: the provider's answer is "
                "not known yet (it did not answer); it is settled within minutes.",
            },
            "amount": {"$ref": "#/components/schemas/Money"},
            "card": {
                "type": ["object", "null"],
                "required": ["brand", "last4"],
                "additionalProperties": False,
                "properties": {"brand": {"type": ["string", "null"]}, "last4": {"type": ["string", "null"]}},
            },
            "client_secret": {"type": "string", "description": "Only while `state` is `requires_action`"},
            "failure_code": {"type": "string", "description": "Only when `state` is `failed`"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "WalletTransaction": {
        "type": "object",
        "required": ["entry_id", "created_at", "description", "amount", "balance_after"],
        "additionalProperties": False,
        "properties": {
            "entry_id": {"type": "integer", "minimum": 1},
            "created_at": {"type": "string", "format": "date-time"},
            "description": {"type": "string", "description": "In the request's language"},
            "amount": {"$ref": "#/components/schemas/Money", "description": "Positive: money in; negative: money out"},
            "balance_after": {"$ref": "#/components/schemas/Money"},
        },
    },
    "WalletTransactionList": {
        "type": "object",
        "required": ["data", "next_before"],
        "additionalProperties": False,
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/WalletTransaction"}, "description": "Newest first"},
            "next_before": {"type": ["integer", "null"], "minimum": 1, "description": "Pass as `before` for the next page; null on the last page"},
        },
    },
    "Card": {
        "type": "object",
        "required": ["id", "brand", "last4", "exp_month", "exp_year", "is_default"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^pm_"},
            "brand": {"type": "string"},
            "last4": {"type": "string"},
            "exp_month": {"type": "integer", "minimum": 0, "maximum": 12},
            "exp_year": {"type": "integer", "minimum": 0},
            "is_default": {"type": "boolean"},
        },
    },
    "CardList": {
        "type": "object",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {"data": {"type": "array", "items": {"$ref": "#/components/schemas/Card"}, "description": "The default card first"}},
    },
    "CardSetup": {
        "type": "object",
        "required": ["setup_id", "client_secret", "publishable_key"],
        "additionalProperties": False,
        "properties": {
            "setup_id": {"type": "string", "pattern": "^seti_"},
            "client_secret": {"type": "string", "description": "For stripe.js `confirmCardSetup` or the mobile SDK"},
            "publishable_key": {"type": "string"},
        },
    },
    "AddCardRequest": {
        "type": "object",
        "required": ["setup_id"],
        "properties": {"setup_id": {"type": "string", "pattern": "^seti_[A-Za-z0-9_]{1,250}$", "description": "From POST /payment-methods/setup"}},
    },
}

_REPLAYED = {"Idempotent-Replayed": {"description": "`true` when this is the stored answer to an earlier request with the same Idempotency-Key", "schema": {"const": "true"}}}
_UNAVAILABLE = "Card payments are not configured (`payments_unavailable`) or the card payment service did not answer (`provider_unavailable`)"
_PROVIDER_FAILED = {"502": _problem("The card payment service answered with an error (`provider_error`)")}


def _body(schema: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _with_headers(response: dict, headers: dict) -> dict:
    return {**response, "headers": {**response.get("headers", {}), **headers}}


def wallet_paths(secured: list) -> dict:
    """The wallet and payment-method operations (webapp/api/wallet.py)."""
    top_up_id = {"name": "top_up_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}
    pm_id = {"name": "payment_method_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": PM_ID}}
    bad_body = {
        "413": _problem("Body larger than 2 MiB (`too_large`)"),
        "415": _problem("Body is not JSON (`unsupported_media_type`)"),
    }
    return {
        "/wallet": {
            "get": {
                "operationId": "getWallet",
                "summary": "Wallet balance, money held for sessions, and the top-up limits",
                "security": secured,
                "responses": {"200": _json("Wallet", "The wallet"), **COMMON_ERRORS},
            }
        },
        "/wallet/top-ups": {
            "post": {
                "operationId": "createTopUp",
                "summary": "Top up the wallet with a saved card",
                "description": "Answers 201 with the top-up: `succeeded` (credited) or `requires_action` (3-D Secure: confirm "
                "`client_secret` in the client, then POST /wallet/top-ups/{top_up_id}/confirm). With an Idempotency-Key, the same "
                "key and body replay the first answer (header `Idempotent-Replayed: true`) without a second charge.",
                "security": secured,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "A unique key per top-up the client means to make (e.g. a UUID), kept 24 hours per account",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "\\S"},
                    }
                ],
                "requestBody": _body("TopUpRequest"),
                "responses": {
                    "201": _with_headers(_json("TopUp", "The top-up: `succeeded`, or `requires_action` for 3-D Secure"), _REPLAYED),
                    "400": _problem("Idempotency-Key empty or longer than 255 characters (`invalid_idempotency_key`)"),
                    "402": _with_headers(
                        _problem("The card was declined (`card_declined`, see `decline_reason`) or the payment refused (`payment_failed`); "
                                 "`top_up_id` names the failed top-up"),
                        _REPLAYED,
                    ),
                    "409": _problem(
                        "A request with this Idempotency-Key is still running (`request_in_progress`)",
                        {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                    ),
                    **bad_body,
                    "422": _with_headers(
                        _problem("Body not a JSON object (`invalid_json`); a field missing or malformed (`invalid_request`, see `errors`); "
                                 "amount outside the limits (`amount_out_of_range`, with `minimum` and `maximum`); not the wallet's "
                                 "currency (`wrong_currency`, with `currency`); not one of the account's saved cards "
                                 "(`unknown_payment_method`); Idempotency-Key used for another request (`idempotency_key_reused`)"),
                        _REPLAYED,
                    ),
                    "502": _with_headers(_problem("The card payment service refused to work (`provider_error`); see `top_up_id`"), _REPLAYED),
                    "503": _with_headers(
                        _problem(_UNAVAILABLE + ". With `top_up_id`, the top-up was sent and its outcome is settled later: "
                                 "look it up instead of paying again"),
                        _REPLAYED,
                    ),
                    **COMMON_ERRORS,
                },
            }
        },
        "/wallet/top-ups/{top_up_id}": {
            "get": {
                "operationId": "getTopUp",
                "summary": "One of the account's top-ups",
                "security": secured,
                "parameters": [top_up_id],
                "responses": {
                    "200": _json("TopUp", "The top-up"),
                    "404": _problem("No such top-up on this account (`not_found`)"),
                    "503": _problem(_UNAVAILABLE + " (only asked while 3-D Secure is pending, for `client_secret`)"), **_PROVIDER_FAILED,
                    **COMMON_ERRORS,
                },
            }
        },
        "/wallet/top-ups/{top_up_id}/confirm": {
            "post": {
                "operationId": "confirmTopUp",
                "summary": "After 3-D Secure in the client: bring the top-up up to date (credits the wallet once)",
                "security": secured,
                "parameters": [top_up_id],
                "responses": {
                    "200": _json("TopUp", "The top-up as it stands now"),
                    "404": _problem("No such top-up on this account (`not_found`)"),
                    "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED,
                    **COMMON_ERRORS,
                },
            }
        },
        "/wallet/transactions": {
            "get": {
                "operationId": "listWalletTransactions",
                "summary": "The wallet's movements, newest first, with the balance after each",
                "security": secured,
                "parameters": [
                    {"name": "before", "in": "query", "required": False, "description": "`next_before` of the previous page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                ],
                "responses": {
                    "200": _json("WalletTransactionList", "One page of movements"),
                    "422": _problem("`before` or `limit` not a whole number in range (`invalid_request`, see `errors`)"),
                    **COMMON_ERRORS,
                },
            }
        },
        "/payment-methods": {
            "get": {
                "operationId": "listPaymentMethods",
                "summary": "The account's saved cards",
                "security": secured,
                "responses": {"200": _json("CardList", "Saved cards, the default first"), "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED, **COMMON_ERRORS},
            },
            "post": {
                "operationId": "addPaymentMethod",
                "summary": "Save the card of a setup the client has confirmed",
                "security": secured,
                "requestBody": _body("AddCardRequest"),
                "responses": {
                    "201": _json("Card", "The saved card (the first card becomes the default)"),
                    "402": _problem("The card was declined when it was checked (`card_declined`, see `decline_reason`)"),
                    "404": _problem("No such card setup for this account (`setup_not_found`)"),
                    "409": _problem("The client has not confirmed the setup yet (`setup_incomplete`)"),
                    **bad_body,
                    "422": _problem("Body not a JSON object (`invalid_json`) or `setup_id` missing or malformed (`invalid_request`)"),
                    "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED,
                    **COMMON_ERRORS,
                },
            },
        },
        "/payment-methods/setup": {
            "post": {
                "operationId": "startPaymentMethodSetup",
                "summary": "Start saving a card: confirm `client_secret` with stripe.js or the mobile SDK, then POST /payment-methods",
                "security": secured,
                "responses": {
                    "201": {
                        **_json("CardSetup", "A card setup to confirm in the client"),
                        "headers": {"Cache-Control": {"required": True, "schema": {"const": "no-store"}}},
                    },
                    "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED,
                    **COMMON_ERRORS,
                },
            }
        },
        "/payment-methods/{payment_method_id}/default": {
            "post": {
                "operationId": "setDefaultPaymentMethod",
                "summary": "Make a saved card the default",
                "security": secured,
                "parameters": [pm_id],
                "responses": {
                    "200": _json("Card", "The card, now the default"),
                    "404": _problem("No such card on this account (`not_found`)"),
                    "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED,
                    **COMMON_ERRORS,
                },
            }
        },
        "/payment-methods/{payment_method_id}": {
            "delete": {
                "operationId": "removePaymentMethod",
                "summary": "Remove a saved card",
                "security": secured,
                "parameters": [pm_id],
                "responses": {
                    "204": {"description": "Removed"},
                    "404": _problem("No such card on this account (`not_found`)"),
                    "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED,
                    **COMMON_ERRORS,
                },
            }
        },
    }


# --- connectors: prices before paying (webapp/api/connectors.py) -------------------------------

DECIMAL = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$", "description": "An exact decimal number, as a string"}
DECIMAL_OR_NULL = {"type": ["string", "null"], "pattern": "^[0-9]+(\\.[0-9]+)?$"}
CONNECTOR_CODE = "^[A-Za-z0-9_-]+$"


def _nullable(ref: str) -> dict:
    return {"anyOf": [{"$ref": f"#/components/schemas/{ref}"}, {"type": "null"}]}


CONNECTOR_SCHEMAS = {
    "PriceRestrictions": {
        "type": "object",
        "description": "When a price applies, from the OCPI element's restrictions (null: not restricted on that). Times are local "
        "wall-clock times of the site's time zone; end_time and end_date are exclusive; kWh and durations count from the session start.",
        "required": ["days_of_week", "start_time", "end_time", "wraps_midnight", "start_date", "end_date", "min_kwh", "max_kwh",
                     "min_power_kw", "max_power_kw", "min_current_a", "max_current_a", "min_duration_s", "max_duration_s"],
        "additionalProperties": False,
        "properties": {
            "days_of_week": {"type": ["array", "null"], "items": {"enum": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"]}},
            "start_time": {"type": ["string", "null"], "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "end_time": {"type": ["string", "null"], "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "wraps_midnight": {"type": "boolean", "description": "end_time before start_time: the window runs past midnight (22:00-08:00)"},
            "start_date": {"type": ["string", "null"], "format": "date"},
            "end_date": {"type": ["string", "null"], "format": "date"},
            "min_kwh": DECIMAL_OR_NULL,
            "max_kwh": DECIMAL_OR_NULL,
            "min_power_kw": DECIMAL_OR_NULL,
            "max_power_kw": DECIMAL_OR_NULL,
            "min_current_a": DECIMAL_OR_NULL,
            "max_current_a": DECIMAL_OR_NULL,
            "min_duration_s": {"type": ["integer", "null"], "minimum": 0},
            "max_duration_s": {"type": ["integer", "null"], "minimum": 0},
        },
    },
    "PriceComponent": {
        "type": "object",
        "description": "One price a driver sees, per kWh, per minute (charging or idle time) or per session.",
        "required": ["dimension", "unit", "price_excl_vat", "price_incl_vat", "vat_rate", "exact", "price_per_hour_excl_vat", "step_size",
                     "element", "restrictions", "otherwise", "grace_period"],
        "additionalProperties": False,
        "properties": {
            "dimension": {"enum": ["ENERGY", "TIME", "FLAT", "PARKING_TIME"]},
            "unit": {"enum": ["kWh", "min", "session"]},
            "price_excl_vat": DECIMAL,
            "price_incl_vat": DECIMAL,
            "vat_rate": {**DECIMAL_OR_NULL, "description": "Percent; null when no VAT applies to this price"},
            "exact": {"type": "boolean", "description": "false when a per-minute price was rounded to 12 decimals (the hourly price is exact)"},
            "price_per_hour_excl_vat": {**DECIMAL_OR_NULL, "description": "TIME and PARKING_TIME: the tariff's own hourly price"},
            "step_size": {"type": "integer", "minimum": 1, "description": "OCPI step_size: Wh for ENERGY, seconds for time"},
            "element": {"type": "integer", "minimum": 0, "description": "Index of the OCPI tariff element"},
            "restrictions": {"$ref": "#/components/schemas/PriceRestrictions"},
            "otherwise": {"type": "boolean", "description": "Applies at other times than the restricted prices of the same dimension before it"},
            "grace_period": {
                "type": ["object", "null"],
                "description": "PARKING_TIME: idle time that is free, counted from the session start (OCPI 2.2.1 durations)",
                "required": ["seconds", "counted_from"],
                "additionalProperties": False,
                "properties": {"seconds": {"type": "integer", "minimum": 1}, "counted_from": {"const": "session_start"}},
            },
        },
    },
    "PriceBound": {
        "type": "object",
        "required": ["excl_vat", "incl_vat"],
        "additionalProperties": False,
        "properties": {"excl_vat": DECIMAL, "incl_vat": {**DECIMAL_OR_NULL, "description": "null when it cannot be known before the session"}},
    },
    "Prices": {
        "type": "object",
        "description": "The tariff in force as a driver sees it (EU AFIR): per kWh, per minute, per session, idle fee; VAT; min/max price.",
        "required": ["currency", "components", "vat", "min_price", "max_price"],
        "additionalProperties": False,
        "properties": {
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "components": {"type": "array", "items": {"$ref": "#/components/schemas/PriceComponent"}},
            "vat": {
                "type": "object",
                "required": ["rates", "some_prices_without_vat", "prices_shown_include_vat"],
                "additionalProperties": False,
                "properties": {
                    "rates": {"type": "array", "items": DECIMAL},
                    "some_prices_without_vat": {"type": "boolean"},
                    "prices_shown_include_vat": {"const": True},
                },
            },
            "min_price": _nullable("PriceBound"),
            "max_price": _nullable("PriceBound"),
        },
    },
    "PriceText": {
        "type": "object",
        "description": "The prices as text in the language of the request (Accept-Language), ready to show",
        "required": ["locale", "lines", "notes"],
        "additionalProperties": False,
        "properties": {
            "locale": {"enum": ["en", "es", "zh"]},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["dimension", "label", "price", "conditions", "billing"],
                    "additionalProperties": False,
                    "properties": {
                        "dimension": {"enum": ["ENERGY", "TIME", "FLAT", "PARKING_TIME"]},
                        "label": {"type": "string"},
                        "price": {"type": "string"},
                        "conditions": {"type": "string"},
                        "billing": {"type": "string"},
                    },
                },
            },
            "notes": {"type": "array", "items": {"type": "string"}},
        },
    },
    "TariffVersionRef": {
        "type": "object",
        "required": ["version_id", "version", "effective_from", "ocpi"],
        "additionalProperties": False,
        "properties": {
            "version_id": {"type": "integer", "minimum": 1},
            "version": {"type": "integer", "minimum": 1},
            "effective_from": {"type": "string", "format": "date-time"},
            "ocpi": {
                "type": "object",
                "description": "The OCPI 2.2.1 Tariff object in force, as stored (prices are exact JSON numbers)",
                "required": ["currency", "elements"],
            },
        },
    },
    "HoldLimits": {
        "type": "object",
        "description": "Where a session under the default hold stops: at this energy or after this charging time; idle fees are covered this long",
        "required": ["max_energy_kwh", "max_charging_seconds", "max_idle_seconds"],
        "additionalProperties": False,
        "properties": {
            "max_energy_kwh": DECIMAL,
            "max_charging_seconds": {"type": "integer", "minimum": 0},
            "max_idle_seconds": {"type": "integer", "minimum": 0},
        },
    },
    "Connector": {
        "type": "object",
        "required": ["connector_code", "number", "standard", "max_power_kw", "charger", "site", "currency", "available_for_payment", "status",
                     "prices", "display", "tariff", "default_hold", "hold_limits"],
        "additionalProperties": False,
        "properties": {
            "connector_code": {"type": "string", "pattern": CONNECTOR_CODE},
            "number": {"type": "integer", "minimum": 1, "description": "OCPP connectorId"},
            "standard": {"type": "string", "description": "OCPI ConnectorType, e.g. IEC_62196_T2"},
            "max_power_kw": {"type": "integer", "minimum": 0},
            "charger": {
                "type": "object",
                "required": ["vendor", "model"],
                "additionalProperties": False,
                "properties": {"vendor": {"type": ["string", "null"]}, "model": {"type": ["string", "null"]}},
            },
            "site": {
                "type": "object",
                "required": ["name", "address", "time_zone"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "address": {"type": "string"}, "time_zone": {"type": "string", "description": "IANA time zone"}},
            },
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "available_for_payment": {"type": "boolean", "description": "false when no tariff is in force now: a session cannot be paid for"},
            "status": {
                "enum": ["available", "in_use", "faulted", "unavailable", "offline"],
                "description": "Whether a session can start now: `available`; `in_use` (a session or another car holds it); `faulted` or "
                "`unavailable` (out of order); `offline` (the charger is not connected)",
            },
            "prices": _nullable("Prices"),
            "display": _nullable("PriceText"),
            "tariff": _nullable("TariffVersionRef"),
            "default_hold": {**_nullable("Money"), "description": "The card hold of a session started now, VAT included"},
            "hold_limits": _nullable("HoldLimits"),
        },
    },
}


def connector_paths() -> dict:
    """The public connector look-up (webapp/api/connectors.py)."""
    return {
        "/connectors/{connector_code}": {
            "get": {
                "operationId": "getConnector",
                "summary": "A connector as a driver sees it after scanning its QR code: place, prices and the default card hold",
                "description": "Public, no token. Prices are those of the tariff version in force now; `display` is in the language of "
                "Accept-Language (en, es, zh). The hold is sized for a session started now, so it can change with time-of-use windows.",
                "parameters": [
                    {"name": "connector_code", "in": "path", "required": True, "description": "The code under the QR code, e.g. D101",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 16, "pattern": CONNECTOR_CODE}},
                ],
                "responses": {
                    "200": {
                        **_json("Connector", "The connector, its prices and the default hold"),
                        "headers": {"Content-Language": {"required": True, "schema": {"enum": ["en", "es", "zh"]}}},
                    },
                    "404": _problem("No connector has this code (`connector_not_found`)"),
                    "429": _problem("Too many look-ups from this address (`rate_limited`)", {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}),
                },
            }
        }
    }


# --- charging sessions (webapp/api/sessions.py) -------------------------------------------------

SESSION_STATES = ["pending", "authorized", "start_requested", "charging", "finishing", "completed", "cancelled", "start_failed",
                  "start_timeout", "failed", "review"]
SESSION_TOKEN = "^[A-Za-z0-9_-]{16,64}$"
_DATETIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}

SESSION_SCHEMAS = {
    "StartSessionRequest": {
        "type": "object",
        "description": "With a bearer token: the account pays from its wallet or with a saved card (`email` is ignored: the receipt goes "
        "to the account's address). Without one: a guest pays with a card from the card element and gives `email`.",
        "required": ["connector_code", "payment"],
        "properties": {
            "connector_code": {"type": "string", "minLength": 1, "maxLength": 16, "pattern": CONNECTOR_CODE, "description": "The code under the QR code"},
            "payment": {
                "oneOf": [
                    {"type": "object", "required": ["type"], "additionalProperties": False, "properties": {"type": {"const": "wallet"}},
                     "description": "The account's wallet (a bearer token is needed)"},
                    {"type": "object", "required": ["type", "payment_method_id"], "additionalProperties": False,
                     "properties": {"type": {"const": "card"}, "payment_method_id": {"type": "string", "pattern": PM_ID}},
                     "description": "A saved card of the account (GET /payment-methods), or a guest's card from the card element"},
                ],
            },
            "email": {"type": "string", "maxLength": 254, "pattern": "^[^@\\s]+@[^@\\s]+$", "description": "Guests: where the receipt and the session link go"},
            "cap": {"$ref": "#/components/schemas/Money", "description": "A spending cap, VAT included, in the charger's currency: the hold is "
                    "lowered to it and the session stops there (a cap above the default hold changes nothing)"},
            "max_energy_kwh": {"type": "string", "pattern": "^[0-9]{1,4}(\\.[0-9]{1,3})?$", "description": "Stop after this much energy, e.g. \"12.5\""},
        },
    },
    "ChargingSession": {
        "type": "object",
        "description": "Closed where it is used (`unevaluatedProperties: false`), so StartedSession can add `session_token`.",
        "required": ["id", "state", "connector", "payment", "hold", "cap", "max_energy_kwh", "energy_kwh", "power_kw", "duration_s", "cost",
                     "final", "stop_requested", "created_at", "started_at", "stopped_at", "ended_at", "failure_code", "links"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "state": {
                "enum": SESSION_STATES,
                "description": "`pending`: the card hold waits for 3-D Secure (`client_secret`) or for the provider; `start_requested`: the "
                "charger was asked to start, plug in the car; `charging`; `finishing`: stopped, the car may still be plugged in (idle time); "
                "`completed`: billed. Ended without charging (nothing held): `cancelled`, `start_failed`, `start_timeout`, `failed`. "
                "`review`: a person settles it.",
            },
            "connector": {
                "type": "object",
                "required": ["connector_code", "number", "site"],
                "additionalProperties": False,
                "properties": {
                    "connector_code": {"type": "string"},
                    "number": {"type": "integer", "minimum": 1},
                    "site": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {"name": {"type": "string"}}},
                },
            },
            "payment": {
                "type": "object",
                "required": ["type", "card"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["wallet", "card"]},
                    "card": {
                        "type": ["object", "null"],
                        "required": ["brand", "last4"],
                        "additionalProperties": False,
                        "properties": {"brand": {"type": ["string", "null"]}, "last4": {"type": ["string", "null"]}},
                    },
                },
            },
            "hold": {"$ref": "#/components/schemas/Money", "description": "Reserved for this session: the session stops before its cost passes it"},
            "cap": {**_nullable("Money"), "description": "The driver's spending cap, when it lowered the hold"},
            "max_energy_kwh": {**DECIMAL, "description": "The session stops at this energy"},
            "energy_kwh": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$",
                           "description": "Delivered so far (negative only when the meter went backwards: the session goes to review)"},
            "power_kw": {**DECIMAL_OR_NULL, "description": "The last power the charger reported"},
            "duration_s": {"type": "integer", "minimum": 0, "description": "Charging time so far (until the stop)"},
            "cost": {"$ref": "#/components/schemas/Money", "description": "Cost so far, VAT included (when completed: what was captured)"},
            "final": {
                "type": ["object", "null"],
                "description": "The bill, once completed: the priced cost and what was captured (min(cost, hold), or 0 below the site's minimum)",
                "required": ["excl_vat", "vat", "incl_vat", "captured"],
                "additionalProperties": False,
                "properties": {k: {"$ref": "#/components/schemas/Money"} for k in ("excl_vat", "vat", "incl_vat", "captured")},
            },
            "stop_requested": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _DATETIME_OR_NULL,
            "stopped_at": _DATETIME_OR_NULL,
            "ended_at": {**_DATETIME_OR_NULL, "description": "The car left (idle time ends)"},
            "failure_code": {"type": ["string", "null"], "description": "Why it ended without charging, or went to review"},
            "links": {
                "type": "object",
                "required": ["self", "stop"],
                "additionalProperties": False,
                "properties": {"self": {"type": "string"}, "stop": {"type": "string"}, "confirm": {"type": "string", "description": "While pending"}},
            },
            "client_secret": {"type": "string", "description": "Only while `pending` for 3-D Secure: confirm it with stripe.js "
                              "`confirmCardPayment` or the mobile SDK, then POST /sessions/{session_id}/confirm"},
        },
    },
    "StartedSession": {
        "allOf": [
            {"$ref": "#/components/schemas/ChargingSession"},
            {"type": "object", "properties": {"session_token": {
                "type": "string", "pattern": SESSION_TOKEN,
                "description": "Guests only, in this answer only: send it as X-Session-Token to see, stop or confirm the session"}}},
        ],
        "unevaluatedProperties": False,
    },
    "ChargingSessionList": {
        "type": "object",
        "required": ["data", "next_before"],
        "additionalProperties": False,
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/ChargingSession", "unevaluatedProperties": False}, "description": "Newest first"},
            "next_before": {"type": ["integer", "null"], "minimum": 1, "description": "Pass as `before` for the next page; null on the last page"},
        },
    },
}


def session_paths(secured: list) -> dict:
    """The charging-session operations (webapp/api/sessions.py)."""
    # A bearer token or a guest's session token; neither (or a token that is not the session's) is 404.
    account_or_guest = [{"bearer": []}, {}]
    session_id = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}
    session_token = {"name": "X-Session-Token", "in": "header", "required": False,
                     "description": "A guest's session token (from the answer that created the session, or the emailed link)",
                     "schema": {"type": "string", "pattern": SESSION_TOKEN}}
    no_store = {"Cache-Control": {"required": True, "schema": {"const": "no-store"}}}
    unauthorized = _unauthorized("Malformed Authorization header (`unauthenticated`); unknown, revoked or expired token (`invalid_token`)")
    not_found = _problem("No such session, or not yours: no token, another account's, or not its X-Session-Token (`not_found`)")

    def one_session(description: str) -> dict:
        schema = {"$ref": "#/components/schemas/ChargingSession", "unevaluatedProperties": False}
        return {"description": description, "content": {"application/json": {"schema": schema}}, "headers": no_store}

    bad_body = {"413": _problem("Body larger than 2 MiB (`too_large`)"), "415": _problem("Body is not JSON (`unsupported_media_type`)")}
    return {
        "/sessions": {
            "post": {
                "operationId": "createSession",
                "summary": "Start charging: hold the money (wallet, saved card or a guest's card), then ask the charger to start",
                "description": "The bearer token is optional: without one the caller is a guest, pays by card and gives `email`; the answer "
                "then carries `session_token` (shown only in the answer that created the session). 201 means the session is under way: "
                "`start_requested` (plug in the car), or `pending` with `client_secret` for 3-D Secure (then POST .../confirm). A session "
                "created but ended at once is a problem with `session_id`: 402 (hold refused) or 409 (the charger did not start). With an "
                "Idempotency-Key (scoped per account, or per guest email) the same key and body replay the first answer "
                "(`Idempotent-Replayed: true`) without a second hold.",
                "security": account_or_guest,
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "required": False,
                     "description": "A unique key per session the client means to start (e.g. a UUID), kept 24 hours",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "\\S"}},
                ],
                "requestBody": _body("StartSessionRequest"),
                "responses": {
                    "201": _with_headers(_json("StartedSession", "The session, under way or waiting for 3-D Secure"),
                                         {**_REPLAYED, **no_store, "Location": {"schema": {"type": "string"}}}),
                    "400": _problem("Idempotency-Key empty or longer than 255 characters (`invalid_idempotency_key`)"),
                    "401": _with_headers(_unauthorized("As everywhere (`unauthenticated`, `invalid_token`); or a guest asked to pay from a "
                                                       "wallet (`wallet_needs_account`)"), _REPLAYED),
                    "402": _with_headers(_problem("The session was created but the hold was refused, nothing is held: `card_declined` (see "
                                                  "`decline_reason`), `payment_failed`, `wallet_insufficient`; see `session_id`"), _REPLAYED),
                    "404": _with_headers(_problem("No connector has this code (`connector_not_found`)"), _REPLAYED),
                    "409": _with_headers(_problem(
                        "Nothing was started and nothing is held: the connector is in use (`connector_busy`), its charger is offline "
                        "(`charger_offline`), it is out of order (`connector_faulted`), it has no price now (`no_tariff`), or a request "
                        "with this Idempotency-Key is still running (`request_in_progress`, with Retry-After). With `session_id`: the "
                        "session was created and the charger did not start (`charger_rejected`, `charger_offline`); nothing is held"), _REPLAYED),
                    **bad_body,
                    "422": _with_headers(_problem(
                        "Body not a JSON object (`invalid_json`); a field missing or malformed (`invalid_request`, see `errors`); cap "
                        "below the least a session costs (`cap_too_low`, with `minimum` when it can be named); cap or wallet not in the charger's currency "
                        "(`cap_currency`, `wallet_currency`, with `currency`); energy limit of zero (`energy_cap_invalid`); a guest without "
                        "email (`email_required`); a card that is not one of the account's saved cards, or that the provider does not know "
                        "(`unknown_payment_method`); Idempotency-Key used for another request (`idempotency_key_reused`)"), _REPLAYED),
                    "429": _problem("Too many starts from this address (`rate_limited`)", {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}),
                    "502": _with_headers(_problem("The card payment service refused to work (`provider_error`); see `session_id` if set"), _REPLAYED),
                    "503": _with_headers(_problem(
                        _UNAVAILABLE + "; chargers cannot be reached from here (`chargers_unavailable`). With `session_id`: the session "
                        "was created and its hold is settled later (the session shows it): look it up instead of starting again"), _REPLAYED),
                },
            },
            "get": {
                "operationId": "listSessions",
                "summary": "The account's charging sessions, newest first",
                "security": secured,
                "parameters": [
                    {"name": "before", "in": "query", "required": False, "description": "`next_before` of the previous page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                    {"name": "state", "in": "query", "required": False, "description": "Only sessions in this state", "schema": {"enum": SESSION_STATES}},
                ],
                "responses": {
                    "200": _with_headers(_json("ChargingSessionList", "One page of sessions"), no_store),
                    "422": _problem("`before`, `limit` or `state` not valid (`invalid_request`, see `errors`)"),
                    **COMMON_ERRORS,
                },
            },
        },
        "/sessions/{session_id}": {
            "get": {
                "operationId": "getSession",
                "summary": "A session as it stands now: state, energy, power, duration, cost so far, and the bill when completed",
                "security": account_or_guest,
                "parameters": [session_id, session_token],
                "responses": {
                    "200": one_session("The session (`client_secret` while 3-D Secure waits)"),
                    "401": unauthorized,
                    "404": not_found,
                },
            }
        },
        "/sessions/{session_id}/stop": {
            "post": {
                "operationId": "stopSession",
                "summary": "Stop charging (before the car charges: cancel and release the hold)",
                "description": "202 with the session: `cancelled` (it had not started charging; the hold is released), or `charging` with "
                "`stop_requested` (the charger was told to stop; billing follows its stop), or `finishing` (already stopped).",
                "security": account_or_guest,
                "parameters": [session_id, session_token],
                "responses": {
                    "202": one_session("The session after the stop request"),
                    "401": unauthorized,
                    "404": not_found,
                    "409": _problem("The session has already ended (`not_stoppable`); the charger is offline, so unplugging the cable stops "
                                    "it (`charger_offline`); the charger refused (`stop_rejected`)"),
                    "503": _problem(_UNAVAILABLE + " (releasing a card hold); chargers cannot be reached from here (`chargers_unavailable`)"),
                    **_PROVIDER_FAILED,
                    "504": _problem("The charger did not answer (`charger_not_answering`): try again, or unplug the cable"),
                },
            }
        },
        "/sessions/{session_id}/confirm": {
            "post": {
                "operationId": "confirmSession",
                "summary": "After 3-D Secure in the client: check the card hold, then start the charger",
                "description": "Answers like the start: 200 with the session under way (or still `pending`), 402 when the bank refused, "
                "409 when the charger did not start (`session_id` in both). A session that is not waiting for 3-D Secure is answered as it is.",
                "security": account_or_guest,
                "parameters": [session_id, session_token],
                "responses": {
                    "200": one_session("The session as it stands now"),
                    "401": unauthorized,
                    "402": _problem("The hold was refused, nothing is held (`card_declined`, `payment_failed`; see `session_id`)"),
                    "404": not_found,
                    "409": _problem("The charger did not start; nothing is held (`charger_rejected`, `charger_offline`; see `session_id`)"),
                    "503": _problem(_UNAVAILABLE + "; chargers cannot be reached from here (`chargers_unavailable`)"),
                    **_PROVIDER_FAILED,
                },
            }
        },
    }


# --- receipts, invoices and credit notes (webapp/api/receipts.py) --------------------------------

DOCUMENT_NUMBER = "^[A-Z0-9]{1,24}(-[A-Z0-9]{1,24}){1,4}$"
_TEXT = {"type": "string"}
_NULLABLE_TEXT = {"type": ["string", "null"]}

RECEIPT_SCHEMAS = {
    "ReceiptSummary": {
        "type": "object",
        "description": "A receipt, invoice or credit note. Amounts are positive, also on a credit note (it gives money back).",
        "required": ["number", "kind", "issued_at", "source", "total", "links"],
        "properties": {
            "number": {"type": "string", "pattern": DOCUMENT_NUMBER, "description": "e.g. VP-2026-000123; credit notes VP-CN-2026-000004"},
            "kind": {"enum": ["invoice", "receipt", "credit_note"]},
            "issued_at": {"type": "string", "format": "date-time"},
            "source": {"type": "string", "description": "What was paid: `session:<id>`, `card_payment:<id>` (a wallet top-up), ..."},
            "total": {"$ref": "#/components/schemas/Money"},
            "links": {
                "type": "object",
                "required": ["html", "pdf", "check"],
                "properties": {
                    "html": {"type": "string", "description": "The document's page (signed in as its owner)"},
                    "pdf": {"type": "string", "description": "GET /receipts/{number}.pdf"},
                    "check": {"type": "string", "description": "The public check page its QR code links to"},
                },
            },
        },
    },
    "ReceiptList": {
        "type": "object",
        "required": ["data", "next_before"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/ReceiptSummary"}},
            "next_before": {"type": ["integer", "null"], "minimum": 1, "description": "Pass as `before` for the next page; null on the last"},
        },
    },
    "Receipt": {
        "allOf": [
            {"$ref": "#/components/schemas/ReceiptSummary"},
            {
                "type": "object",
                "required": ["locale", "status", "replaced_by", "seller", "buyer", "lines", "vat", "totals", "payment", "session",
                             "original", "replaces"],
                "properties": {
                    "locale": {"enum": ["en", "es", "zh"], "description": "The document's language (its PDF's)"},
                    "status": {"enum": ["valid", "partly_credited", "credited", "replaced"]},
                    "replaced_by": {**_NULLABLE_TEXT, "description": "`replaced`: the number of the invoice issued in its place"},
                    "seller": {"type": "object", "properties": {k: _TEXT for k in ("name", "legal_name", "address", "vat_id")}},
                    "buyer": {"type": "object", "properties": {k: _TEXT for k in ("email", "company_name", "address", "vat_id")}},
                    "lines": {"type": "array", "items": {
                        "type": "object",
                        "required": ["kind", "description", "quantity", "unit", "unit_price", "vat_rate", "amount"],
                        "properties": {
                            "kind": {"type": "string", "description": "energy, time, parking, flat, adjustment, wallet_credit, credit, credit_balance"},
                            "description": {"type": "string", "description": "In the request's language (Accept-Language)"},
                            "quantity": {**_NULLABLE_TEXT, "description": "Decimal string"},
                            "unit": {**_NULLABLE_TEXT, "description": "kWh, h or session"},
                            "unit_price": {**_NULLABLE_TEXT, "description": "Excl. VAT, decimal string in the currency"},
                            "vat_rate": {**_NULLABLE_TEXT, "description": "Percent, decimal string; null: outside the scope of VAT"},
                            "note": _NULLABLE_TEXT,
                            "amount": {"$ref": "#/components/schemas/Money", "description": "Excl. VAT"},
                        },
                    }},
                    "vat": {"type": "array", "items": {
                        "type": "object",
                        "required": ["rate", "net", "vat", "gross"],
                        "properties": {"rate": _NULLABLE_TEXT, "net": {"$ref": "#/components/schemas/Money"},
                                       "vat": {"$ref": "#/components/schemas/Money"}, "gross": {"$ref": "#/components/schemas/Money"}},
                    }},
                    "totals": {"type": "object", "required": ["net", "vat", "total"],
                               "properties": {k: {"$ref": "#/components/schemas/Money"} for k in ("net", "vat", "total")}},
                    "payment": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                        "method": {"enum": ["card", "wallet"]}, "brand": _NULLABLE_TEXT, "last4": _NULLABLE_TEXT,
                        **{k: _nullable("Money") for k in ("held", "captured", "released", "refunded")},
                    }}]},
                    "session": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                        "id": {"type": "integer"}, "site": _TEXT, "connector_code": _TEXT, "started_at": _NULLABLE_TEXT,
                        "ended_at": _NULLABLE_TEXT, "time_zone": _TEXT, "energy_kwh": _NULLABLE_TEXT, "meter_start_wh": _NULLABLE_TEXT,
                        "meter_stop_wh": _NULLABLE_TEXT,
                    }}]},
                    "original": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["number"], "properties": {"number": _TEXT}}],
                                 "description": "A credit note's invoice or receipt"},
                    "replaces": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"number": _TEXT, "credit_note": _TEXT}}],
                                 "description": "Reissued with the buyer's business details: the document it replaces and the credit note that cancelled it"},
                    "reason": _NULLABLE_TEXT,
                },
            },
        ],
    },
}


def receipt_paths(secured: list) -> dict:
    """The account's receipts, invoices and credit notes (webapp/api/receipts.py)."""
    number = {"name": "number", "in": "path", "required": True, "schema": {"type": "string", "pattern": DOCUMENT_NUMBER}}
    no_store = {"Cache-Control": {"required": True, "schema": {"const": "no-store"}}}
    not_found = _problem("No such document, or another account's (`not_found`)")
    return {
        "/receipts": {
            "get": {
                "operationId": "listReceipts",
                "summary": "The account's receipts, invoices and credit notes, newest first",
                "security": secured,
                "parameters": [
                    {"name": "month", "in": "query", "required": False, "description": "Only those issued in this month (UTC), YYYY-MM",
                     "schema": {"type": "string", "pattern": "^(19|20|21)[0-9]{2}-(0[1-9]|1[0-2])$"}},
                    {"name": "before", "in": "query", "required": False, "description": "`next_before` of the previous page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                ],
                "responses": {
                    "200": _with_headers(_json("ReceiptList", "One page of documents"), no_store),
                    "422": _problem("`month`, `before` or `limit` not valid (`invalid_request`, see `errors`)"),
                    **COMMON_ERRORS,
                },
            }
        },
        "/receipts/{number}": {
            "get": {
                "operationId": "getReceipt",
                "summary": "One document: seller, buyer, lines, VAT per rate, totals, payment, session facts, status and links",
                "security": secured,
                "parameters": [number],
                "responses": {"200": _with_headers(_json("Receipt", "The document"), no_store), "404": not_found, **COMMON_ERRORS},
            }
        },
        "/receipts/{number}.pdf": {
            "get": {
                "operationId": "getReceiptPdf",
                "summary": "One document as a PDF (A4), in the document's language",
                "security": secured,
                "parameters": [number],
                "responses": {
                    "200": {"description": "The PDF", "content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}},
                            "headers": no_store},
                    "404": not_found,
                    **COMMON_ERRORS,
                },
            }
        },
    }


# --- post-paid electricity bills (webapp/api/bills.py) -------------------------------------------

_DECIMAL_TEXT = {"type": "string", "description": "Decimal string"}
BILL_SCHEMAS = {
    "BillSummary": {
        "type": "object",
        "description": "A post-paid electricity bill of one of the account's tenancies (issued or paid).",
        "required": ["id", "period", "state", "overdue", "total", "vat", "net", "due_date", "issued_at", "paid_at", "tenant", "site",
                     "invoice_number", "links"],
        "properties": {
            "id": {"type": "integer"},
            "period": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$", "description": "The month, in the building's time zone"},
            "state": {"enum": ["issued", "paid"]},
            "overdue": {"type": "boolean", "description": "Issued and past its due date"},
            "total": {"$ref": "#/components/schemas/Money"},
            "vat": {"$ref": "#/components/schemas/Money"},
            "net": {"$ref": "#/components/schemas/Money"},
            "due_date": {"type": ["string", "null"], "format": "date"},
            "issued_at": {"type": ["string", "null"], "format": "date-time"},
            "paid_at": {"type": ["string", "null"], "format": "date-time"},
            "tenant": {"type": "object", "required": ["id", "name", "unit"],
                       "properties": {"id": {"type": "integer"}, "name": _TEXT, "unit": _TEXT}},
            "site": _TEXT,
            "invoice_number": {**_NULLABLE_TEXT, "description": "The bill's invoice (GET /receipts/{number})"},
            "links": {"type": "object", "required": ["pay", "invoice"],
                      "properties": {"pay": {"type": "string", "description": "The bill's page, where it is paid (signed in)"},
                                     "invoice": _NULLABLE_TEXT}},
        },
    },
    "BillList": {
        "type": "object",
        "required": ["data", "next_before"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/BillSummary"}},
            "next_before": {"type": ["integer", "null"], "minimum": 1, "description": "Pass as `before` for the next page; null on the last"},
        },
    },
    "Bill": {
        "allOf": [
            {"$ref": "#/components/schemas/BillSummary"},
            {
                "type": "object",
                "required": ["final", "lines", "meters", "shares"],
                "properties": {
                    "final": {"type": "boolean", "description": "The last bill of a closed account (the month up to its final reading)"},
                    "lines": {"type": "array", "items": {
                        "type": "object",
                        "required": ["kind", "quantity", "unit", "unit_price", "vat_rate", "note", "meter", "amount"],
                        "properties": {
                            "kind": {"enum": ["energy", "demand", "public_area", "line_loss", "fee"]},
                            "quantity": _NULLABLE_TEXT, "unit": _NULLABLE_TEXT,
                            "unit_price": {**_NULLABLE_TEXT, "description": "Excl. VAT, decimal string in the currency"},
                            "vat_rate": _NULLABLE_TEXT,
                            "note": {**_NULLABLE_TEXT, "description": "energy: the band or tier; shares: the method; fee: its name"},
                            "meter": _NULLABLE_TEXT,
                            "amount": {"$ref": "#/components/schemas/Money", "description": "Excl. VAT"},
                        },
                    }},
                    "meters": {"type": "array", "items": {"type": "object", "required": ["meter_code", "kwh", "max_kw"], "properties": {
                        "meter_code": _TEXT, "kwh": _DECIMAL_TEXT, "max_kw": _NULLABLE_TEXT}}},
                    "shares": {"type": "array", "description": "How each shared cost was computed (largest remainder: the shares add up exactly)",
                               "items": {"type": "object",
                                         "required": ["kind", "method", "basis", "tenant_basis", "tenants", "share_kwh", "amount", "vat_rate",
                                                      "shared_kwh", "shared_amount"],
                                         "properties": {
                                             "kind": {"enum": ["public_area", "line_loss"]},
                                             "method": {"enum": ["consumption", "area", "equal", "custom"]},
                                             "basis": {**_DECIMAL_TEXT, "description": "Σ of the tenants' bases (kWh, m², count or ratio)"},
                                             "tenant_basis": {**_DECIMAL_TEXT, "description": "This tenant's basis"},
                                             "tenants": {"type": "integer"}, "share_kwh": _DECIMAL_TEXT,
                                             "amount": {"$ref": "#/components/schemas/Money"}, "vat_rate": _TEXT,
                                             "shared_kwh": _DECIMAL_TEXT, "shared_amount": {"$ref": "#/components/schemas/Money"},
                                             "loss_kwh": _NULLABLE_TEXT, "master_kwh": _NULLABLE_TEXT, "sub_meters_kwh": _NULLABLE_TEXT,
                                         }}},
                },
            },
        ],
    },
}


def bill_paths(secured: list) -> dict:
    """The account's post-paid bills (webapp/api/bills.py)."""
    no_store = {"Cache-Control": {"required": True, "schema": {"const": "no-store"}}}
    return {
        "/bills": {
            "get": {
                "operationId": "listBills",
                "summary": "The account's electricity bills (issued or paid), newest first",
                "security": secured,
                "parameters": [
                    {"name": "state", "in": "query", "required": False, "schema": {"enum": ["issued", "paid"]}},
                    {"name": "before", "in": "query", "required": False, "description": "`next_before` of the previous page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                ],
                "responses": {
                    "200": _with_headers(_json("BillList", "One page of bills"), no_store),
                    "422": _problem("`state`, `before` or `limit` not valid (`invalid_request`, see `errors`)"),
                    **COMMON_ERRORS,
                },
            }
        },
        "/bills/{bill_id}": {
            "get": {
                "operationId": "getBill",
                "summary": "One bill: lines, meters, and how each shared cost (public area, line loss) was computed",
                "security": secured,
                "parameters": [{"name": "bill_id", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID}}],
                "responses": {"200": _with_headers(_json("Bill", "The bill"), no_store),
                              "404": _problem("No such bill, or another account's (`not_found`)"), **COMMON_ERRORS},
            }
        },
    }


# --- meters: status and top-ups (webapp/api/meters.py) ------------------------------------------

METER_CODE = "^[A-Za-z0-9_-]{1,16}$"
_PRICE = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$", "description": "An exact decimal number, as a string"}

METER_SCHEMAS = {
    "MeterPrice": {
        "type": "object",
        "required": ["band", "price_per_kwh", "vat_rate", "currency", "from", "until"],
        "additionalProperties": False,
        "properties": {
            "band": {"type": "string", "description": "`peak`, `flat`, `valley` (time of use), `tier1`… (tiered), `flat` (flat tariff)"},
            "price_per_kwh": {**_PRICE, "description": "Per kWh, VAT included, in major units (4 decimals)"},
            "vat_rate": {**_PRICE, "description": "Percent"},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "from": {"type": ["string", "null"], "format": "date-time", "description": "null: in force now"},
            "until": {"type": ["string", "null"], "format": "date-time", "description": "null: no change within 8 days"},
        },
    },
    "Meter": {
        "type": "object",
        "required": ["meter_code", "building", "unit", "currency", "price", "top_up", "tenant"],
        "additionalProperties": False,
        "properties": {
            "meter_code": {"type": "string"},
            "building": {"type": "object", "required": ["name", "address", "time_zone"], "additionalProperties": False,
                         "properties": {"name": {"type": "string"}, "address": {"type": "string"}, "time_zone": {"type": "string"}}},
            "unit": {"type": ["string", "null"]},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "price": {"type": "object", "required": ["now", "next", "kind"], "additionalProperties": False, "properties": {
                "now": _nullable("MeterPrice"), "next": _nullable("MeterPrice"),
                "kind": {"enum": ["flat", "tou", "tiered", None], "description": "null: the meter has no price now"}}},
            "top_up": {"type": "object", "required": ["available", "refusal", "minimum", "maximum", "presets"], "additionalProperties": False,
                       "properties": {"available": {"type": "boolean"},
                                      "refusal": {"enum": ["postpaid", "no_tenant", "not_a_tenant_meter", None]},
                                      "minimum": {"$ref": "#/components/schemas/Money"}, "maximum": {"$ref": "#/components/schemas/Money"},
                                      "presets": {"type": "array", "items": {"$ref": "#/components/schemas/Money"}}}},
            "tenant": {
                "description": "Only with the token of the meter's tenant; null for anyone else",
                "anyOf": [{"type": "null"}, {
                    "type": "object",
                    "required": ["serial", "billing", "balance", "days_left", "last_reading", "relay_state", "month_kwh"],
                    "additionalProperties": False,
                    "properties": {
                        "serial": {"type": "string"},
                        "billing": {"enum": ["prepaid", "postpaid"]},
                        "balance": {"anyOf": [{"$ref": "#/components/schemas/Money"}, {"type": "null"}], "description": "Prepaid only; negative on emergency credit"},
                        "days_left": {"type": ["integer", "null"], "minimum": 0,
                                      "description": "Balance ÷ average daily cost of the last 14 days; null when there is too little usage"},
                        "last_reading": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["at", "register_kwh"], "additionalProperties": False,
                                                                      "properties": {"at": {"type": "string", "format": "date-time"}, "register_kwh": _PRICE}}]},
                        "relay_state": {"enum": ["on", "cut", "reconnecting"]},
                        "month_kwh": _PRICE,
                    },
                }],
            },
        },
    },
    "MeterTopUpRequest": {
        "type": "object",
        "required": ["amount", "payment"],
        "properties": {
            "amount": {"$ref": "#/components/schemas/Money", "description": "In the meter's currency, within its `top_up` limits"},
            "payment": {"oneOf": [
                {"type": "object", "required": ["type"], "additionalProperties": False, "properties": {"type": {"const": "wallet"}},
                 "description": "The account's wallet (never below zero)"},
                {"type": "object", "required": ["type", "payment_method_id"], "additionalProperties": False,
                 "properties": {"type": {"const": "card"}, "payment_method_id": {"type": "string", "pattern": PM_ID}},
                 "description": "One of the account's saved cards"},
            ]},
        },
    },
    "MeterTopUp": {
        "type": "object",
        "required": ["id", "source", "meter_code", "state", "amount", "receipt_number", "client_secret", "failure_code", "created_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": ["integer", "null"], "minimum": 1, "description": "The card top-up's id; null when paid from the wallet"},
            "source": {"enum": ["card", "wallet"]},
            "meter_code": {"type": "string"},
            "state": {"enum": ["created", "requires_action", "processing", "authorized", "succeeded", "failed", "canceled"],
                      "description": "`succeeded`: the meter is credited"},
            "amount": {"$ref": "#/components/schemas/Money"},
            "receipt_number": {"type": ["string", "null"], "description": "See GET /documents/{number}"},
            "client_secret": {"type": ["string", "null"], "description": "While `requires_action`: confirm it with stripe.js or the mobile SDK"},
            "failure_code": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
}


def meter_paths(secured: list) -> dict:
    """Meter status and top-ups (webapp/api/meters.py)."""
    code = {"name": "meter_code", "in": "path", "required": True, "description": "The code under the meter's QR code, e.g. M0001",
            "schema": {"type": "string", "minLength": 1, "maxLength": 16, "pattern": METER_CODE}}
    top_up_id = {"name": "top_up_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}
    not_found = _problem("No meter has this code (`meter_not_found`), or no such top-up of this account (`not_found`)")
    return {
        "/meters/{meter_code}": {
            "get": {
                "operationId": "getMeter",
                "summary": "A meter as its QR page shows it: building, unit, price now and next, top-up limits",
                "description": "The token is optional. With the token of the meter's tenant, `tenant` carries the serial, balance, days of "
                "credit left, last reading, relay state and this month's usage; for anyone else it is null.",
                "security": [{"bearer": []}, {}],
                "parameters": [code],
                "responses": {"200": _json("Meter", "The meter"), "404": _problem("No meter has this code (`meter_not_found`)"), **COMMON_ERRORS},
            }
        },
        "/meters/{meter_code}/top-ups": {
            "post": {
                "operationId": "createMeterTopUp",
                "summary": "Top up a prepaid meter with a saved card or the wallet",
                "description": "Anyone with an account may top up any tenant's prepaid meter. 201 with `succeeded` (credited, receipt "
                "issued) or `requires_action` (3-D Secure: confirm `client_secret`, then POST .../confirm). The Idempotency-Key is "
                "required: the same key and body replay the first answer (`Idempotent-Replayed: true`) without a second payment.",
                "security": secured,
                "parameters": [code, {"name": "Idempotency-Key", "in": "header", "required": True,
                                      "description": "A unique key per top-up (e.g. a UUID), kept 24 hours per account",
                                      "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "\\S"}}],
                "requestBody": _body("MeterTopUpRequest"),
                "responses": {
                    "201": _with_headers(_json("MeterTopUp", "The top-up"), _REPLAYED),
                    "400": _problem("Idempotency-Key missing (`idempotency_key_required`), empty or too long (`invalid_idempotency_key`)"),
                    "402": _with_headers(_problem("Declined (`card_declined`, see `decline_reason`), refused (`payment_failed`), see "
                                                  "`top_up_id`; or the wallet holds less (`wallet_insufficient`, see `balance`)"), _REPLAYED),
                    "404": _with_headers(not_found, _REPLAYED),
                    "409": _with_headers(_problem("The meter takes no top-up (`meter_not_payable`, see `refusal`); or a request with this "
                                                  "Idempotency-Key is still running (`request_in_progress`)"), _REPLAYED),
                    "413": _problem("Body larger than 2 MiB (`too_large`)"),
                    "415": _problem("Body is not JSON (`unsupported_media_type`)"),
                    "422": _with_headers(_problem(
                        "Body not a JSON object (`invalid_json`); a field missing or malformed (`invalid_request`, see `errors`); amount "
                        "outside the limits (`amount_out_of_range`); not the meter's currency (`wrong_currency`); wallet in another "
                        "currency (`wallet_currency`); not one of the account's cards (`unknown_payment_method`); Idempotency-Key used "
                        "for another request (`idempotency_key_reused`)"), _REPLAYED),
                    "502": _with_headers(_problem("The card payment service refused to work (`provider_error`); see `top_up_id`"), _REPLAYED),
                    "503": _with_headers(_problem(_UNAVAILABLE + ". With `top_up_id`, the top-up was sent: look it up instead of paying again"),
                                         _REPLAYED),
                    **COMMON_ERRORS,
                },
            }
        },
        "/meters/{meter_code}/top-ups/{top_up_id}": {
            "get": {
                "operationId": "getMeterTopUp",
                "summary": "One of the account's card top-ups of this meter",
                "security": secured,
                "parameters": [code, top_up_id],
                "responses": {"200": _json("MeterTopUp", "The top-up"), "404": not_found, "503": _problem(_UNAVAILABLE), **_PROVIDER_FAILED,
                              **COMMON_ERRORS},
            }
        },
        "/meters/{meter_code}/top-ups/{top_up_id}/confirm": {
            "post": {
                "operationId": "confirmMeterTopUp",
                "summary": "After 3-D Secure in the client: bring the top-up up to date (credits the meter once)",
                "security": secured,
                "parameters": [code, top_up_id],
                "responses": {"200": _json("MeterTopUp", "The top-up as it stands now"), "404": not_found, "503": _problem(_UNAVAILABLE),
                              **_PROVIDER_FAILED, **COMMON_ERRORS},
            }
        },
    }


READING_SCHEMAS = {
    "MeterReadingBatch": {
        "type": "object",
        "required": ["readings"],
        "description": "At most 1,000 readings (more: 413 `batch_too_large`).",
        "properties": {
            "readings": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/MeterReadingIn"}},
        },
    },
    "MeterReadingIn": {
        # No type constraints on purpose: each row is checked on its own and a bad one is answered in its result
        # (status `rejected` with a `code`), never by refusing the batch.
        "description": "A register reading: `{\"meter_code\": string, \"at\": ISO 8601 date-time with an offset, \"register_kwh\": "
        "number or numeric string (kWh on the display, before the CT multiplier, at most 3 decimals), \"demand_kw\": optional number "
        "(maximum demand since the previous reading)}`. Numbers are read exactly (JSON numbers as decimals). A row that is not such an "
        "object is rejected in its result, not the batch.",
        "examples": [{"meter_code": "M0001", "at": "2025-01-31T12:00:00+01:00", "register_kwh": 1234.567, "demand_kw": 3.2}],
    },
    "MeterReadingResult": {
        "type": "object",
        "required": ["index", "meter_code", "at", "status"],
        "properties": {
            "index": {"type": "integer", "minimum": 0, "description": "Position of the row in the request"},
            "meter_code": {"type": ["string", "null"]},
            "at": {"type": ["string", "null"], "description": "The instant in UTC when it could be read"},
            "status": {"enum": ["accepted", "duplicate", "rejected"]},
            "code": {"type": ["string", "null"], "description": "Why it was rejected: unknown_meter (also another operator's meter), "
                     "bad_timestamp, future, bad_number, malformed, conflict (another value at this instant), below_previous (no rollover "
                     "or replacement declared), above_next, above_register_max, no_tariff (prepaid meter without a tariff in force)"},
            "reason": {"type": ["string", "null"], "description": "The same in English, with the values involved"},
        },
    },
    "MeterReadingReport": {
        "type": "object",
        "required": ["accepted", "duplicate", "rejected", "intervals", "superseded", "results"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0},
            "duplicate": {"type": "integer", "minimum": 0},
            "rejected": {"type": "integer", "minimum": 0},
            "intervals": {"type": "integer", "minimum": 0, "description": "Intervals between readings billed by this batch"},
            "superseded": {"type": "integer", "minimum": 0, "description": "Billed intervals split by a late reading (and corrected)"},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/MeterReadingResult"}},
        },
    },
}


def meter_reading_paths() -> dict:
    """Readings posted by meter data collectors (webapp/meters/api.py)."""
    return {
        "/meters/readings": {
            "post": {
                "operationId": "postMeterReadings",
                "summary": "A meter data collector posts up to 1,000 register readings",
                "description": "Authenticated as a collector: an access token from `POST /oauth/token` (OAuth2 client credentials, "
                "client_secret_basic or client_secret_post). 200 with one result per row, in the order sent, also when some rows were "
                "rejected: duplicates (same meter, instant and value) are ignored, out-of-order readings are placed in order, a reading "
                "below the previous one is rejected unless a rollover or replacement was declared. A meter of another operator is "
                "answered like an unknown one.",
                "security": [{"collector": ["meters:write"]}],
                "requestBody": _body("MeterReadingBatch"),
                "responses": {
                    "200": _json("MeterReadingReport", "What became of each row"),
                    "401": _unauthorized("No collector token (`unauthenticated`); unknown, revoked or expired token (`invalid_token`)"),
                    "413": _problem("More than 1,000 readings (`batch_too_large`), or a body larger than 2 MiB (`too_large`)"),
                    "415": _problem("Body is not JSON (`unsupported_media_type`)"),
                    "422": _problem("Body is not a JSON object (`invalid_json`) or has no list of readings (`invalid_request`, see `errors`)"),
                    "429": _problem("Too many requests from this collector (`rate_limited`)",
                                    {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}),
                },
            }
        },
    }


def document() -> dict:
    """Build the document (the server URL follows the configured base URL)."""
    secured = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Voltpay API",
            "version": "1.0.0",
            "description": "Scan-to-pay EV charging and prepaid electricity. Money is `{amount, currency}` in minor units. "
            "Errors are `application/problem+json` with a stable `code`. POSTs that move money accept an `Idempotency-Key` header. "
            "A method a path does not list is answered 405 (`method_not_allowed`) with an `Allow` header; "
            "an unknown path under /api/v1 is 404 (`not_found`).",
        },
        "servers": [{"url": current_app.config["BASE_URL"].rstrip("/") + "/api/v1"}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Token from POST /auth/token"},
                "collector": {"type": "oauth2", "description": "Meter data collectors: OAuth2 client credentials (tokens last one hour)",
                              "flows": {"clientCredentials": {"tokenUrl": current_app.config["BASE_URL"].rstrip("/") + "/oauth/token",
                                                              "scopes": {"meters:write": "Post meter readings"}}}},
            },
            "schemas": {**SCHEMAS, **WALLET_SCHEMAS, **CONNECTOR_SCHEMAS, **SESSION_SCHEMAS, **RECEIPT_SCHEMAS, **BILL_SCHEMAS, **METER_SCHEMAS, **READING_SCHEMAS},
            "headers": HEADERS,
        },
        "paths": {
            "/auth/token": {
                "post": {
                    "operationId": "issueToken",
                    "summary": "Exchange email and password (and TOTP code) for a bearer token",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenRequest"}}}},
                    "responses": {
                        "201": {
                            **_json("IssuedToken", "Token issued; the secret is shown only here"),
                            "headers": {"Cache-Control": {"required": True, "schema": {"const": "no-store"}}},
                        },
                        "401": _unauthorized("Wrong email or password (`invalid_credentials`), code needed (`totp_required`) or wrong (`totp_invalid`)"),
                        "403": _problem("Email address not confirmed yet (`email_unverified`)"),
                        "413": _problem("Body larger than 2 MiB (`too_large`)"),
                        "415": _problem("Body is not JSON (`unsupported_media_type`)"),
                        "422": _problem("Body is not a JSON object (`invalid_json`), or a field is missing or not valid (`invalid_request`, see `errors`)"),
                        "429": _problem(
                            "Too many attempts from this address or for this account (`rate_limited`)",
                            {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                        ),
                    },
                },
                "delete": {
                    "operationId": "revokeCurrentToken",
                    "summary": "Revoke the token used for this request",
                    "security": secured,
                    "responses": {"204": {"description": "Revoked"}, **COMMON_ERRORS},
                },
            },
            "/auth/tokens": {
                "get": {
                    "operationId": "listTokens",
                    "summary": "The account's active tokens",
                    "security": secured,
                    "responses": {"200": _json("TokenList", "Active tokens"), **COMMON_ERRORS},
                }
            },
            "/auth/tokens/{token_id}": {
                "delete": {
                    "operationId": "revokeToken",
                    "summary": "Revoke one of the account's tokens",
                    "security": secured,
                    "parameters": [{"name": "token_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0, "maximum": 2147483647}}],
                    "responses": {"204": {"description": "Revoked"}, "404": _problem("No such token on this account"), **COMMON_ERRORS},
                }
            },
            "/me": {
                "get": {
                    "operationId": "getMe",
                    "summary": "The signed-in account",
                    "security": secured,
                    "responses": {"200": _json("Me", "The account"), **COMMON_ERRORS},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 description of the API",
                            "content": {"application/json": {"schema": {"type": "object", "required": ["openapi", "info", "paths"]}}},
                        }
                    },
                }
            },
            **wallet_paths(secured),
            **connector_paths(),
            **session_paths(secured),
            **receipt_paths(secured),
            **bill_paths(secured),
            **meter_paths(secured),
            **meter_reading_paths(),
        },
    }
