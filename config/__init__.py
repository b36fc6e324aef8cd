"""Default settings and server configurations shipped with labvault."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_INI = CONFIG_DIR / "labvault.ini"
