"""Scan-to-pay charging: sessions, their state machine and money (``service``), and the driver's pages."""
