# Two commands on a fresh machine: `make run` (the demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
# The suite runs on every core (pytest-xdist): each worker has its own database (tests/conftest.py).
TEST_WORKERS ?= auto
STAMP  := $(VENV)/.installed
LOCALES := es zh
PO     := $(foreach l,$(LOCALES),webapp/translations/$(l)/LC_MESSAGES/messages.po)
MO     := $(PO:.po=.mo)

.PHONY: run test install translations extract-messages bench clean

install: $(STAMP) $(MO)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

%.mo: %.po $(STAMP)
	$(BIN)/pybabel compile -f -i $< -o $@

translations: $(MO)

## Re-extract the strings and merge them into the catalogues (then translate the new ones).
extract-messages: $(STAMP)
	$(BIN)/pybabel extract -F babel.cfg -k _l -k lazy_gettext -k ngettext:1,2 -o webapp/translations/messages.pot --no-location --sort-output .
	$(BIN)/pybabel update -i webapp/translations/messages.pot -d webapp/translations --no-fuzzy-matching --ignore-obsolete

run: install
	VOLTPAY_ENV=development $(BIN)/flask --app wsgi demo --port $(PORT)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) instance/*.db instance/*.db-* $(MO)
