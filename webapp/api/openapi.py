"""The OpenAPI 3.1 document of ``/api/v1``; CI checks the running API against it with schemathesis."""

from __future__ import annotations

from flask import current_app


def _problem(description: str) -> dict:
    return {"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _json(schema_ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}}


COMMON_ERRORS = {
    "401": _problem("Missing, unknown, revoked or expired token"),
    "429": _problem("Too many requests; see Retry-After"),
}

SCHEMAS = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details; `code` is stable and meant for programs.",
        "required": ["type", "title", "status", "code", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"type": "string"},
            "detail": {"type": "string"},
            "errors": {"type": "object", "additionalProperties": {"type": "string"}},
            "request_id": {"type": "string"},
        },
    },
    "TokenRequest": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {
            "email": {"type": "string", "format": "email"},
            "password": {"type": "string"},
            "totp_code": {"type": "string", "description": "Authenticator code or recovery code, when two-factor sign-in is on"},
            "name": {"type": "string", "maxLength": 100, "description": "A label to recognise the token later"},
        },
    },
    "Token": {
        "type": "object",
        "required": ["id", "name", "created_at", "expires_at", "last_used_at"],
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
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
                "properties": {"access_token": {"type": "string"}, "token_type": {"const": "Bearer"}},
            },
        ]
    },
    "TokenList": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": {"$ref": "#/components/schemas/Token"}}},
    },
    "Me": {
        "type": "object",
        "required": ["id", "email", "role", "locale", "email_verified", "two_factor_enabled", "created_at"],
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


def document() -> dict:
    """Build the document (the server URL follows the configured base URL)."""
    secured = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Voltpay API",
            "version": "1.0.0",
            "description": "Scan-to-pay EV charging and prepaid electricity. Money is `{amount, currency}` in minor units. "
            "Errors are `application/problem+json` with a stable `code`. POSTs that move money accept an `Idempotency-Key` header.",
        },
        "servers": [{"url": current_app.config["BASE_URL"].rstrip("/") + "/api/v1"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Token from POST /auth/token"}},
            "schemas": SCHEMAS,
        },
        "paths": {
            "/auth/token": {
                "post": {
                    "operationId": "issueToken",
                    "summary": "Exchange email and password (and TOTP code) for a bearer token",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenRequest"}}}},
                    "responses": {
                        "201": _json("IssuedToken", "Token issued; the secret is shown only here"),
                        "401": _problem("Wrong email or password (`invalid_credentials`), code needed (`totp_required`) or wrong (`totp_invalid`)"),
                        "403": _problem("Email address not confirmed yet (`email_unverified`)"),
                        "415": _problem("Body is not JSON"),
                        "422": _problem("A field is missing or not valid"),
                        "429": COMMON_ERRORS["429"],
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
        },
    }
