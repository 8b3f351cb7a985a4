"""Flask extensions, created unbound and attached in ``create_app``."""

from flask_babel import Babel
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()
babel = Babel()
login_manager = LoginManager()
# The OpenID Connect client registry is per app, made in webapp.auth.oidc.init_app (authlib caches clients).
# Limits are declared on the views; storage comes from RATELIMIT_STORAGE_URI (memory:// or Redis).
limiter = Limiter(key_func=get_remote_address, default_limits=[])
