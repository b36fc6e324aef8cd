-- One database per service that owns tables (the image creates labvault_ingest).
CREATE DATABASE labvault_metadata OWNER labvault;
CREATE DATABASE labvault_archive OWNER labvault;
CREATE DATABASE labvault_stats OWNER labvault;
