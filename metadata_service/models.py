"""The metadata service's tables (Pacifica's metadata model) and its schema.

Models bind to ``database``, a proxy that ``common.db.bind`` points at the real
database; importing this module connects to nothing. JSON names are the field
names, except that a primary key called ``id`` travels as ``_id``.
"""
from __future__ import annotations

import logging
import uuid

import peewee

from common.db import is_sqlite, utcnow
from common.migrations import Migration, Schema, create_tables

logger = logging.getLogger(__name__)

database = peewee.DatabaseProxy()


def new_uuid() -> str:
    return str(uuid.uuid4())


def write_transaction():
    """A transaction for writes: on SQLite it takes the write lock at BEGIN.

    A deferred SQLite transaction that reads first and writes later can fail with
    "database is locked" when another writer got in between; taking the lock up
    front makes concurrent writers queue on busy_timeout instead.
    """
    if is_sqlite(database):
        return database.atomic("IMMEDIATE")
    return database.atomic()


class BaseModel(peewee.Model):
    """Every Pacifica object carries when it was created, last updated and deleted."""

    created = peewee.DateTimeField(default=utcnow)
    updated = peewee.DateTimeField(default=utcnow)
    deleted = peewee.DateTimeField(null=True)

    class Meta:
        database = database


class Users(BaseModel):
    id = peewee.AutoField()
    first_name = peewee.CharField(default="")
    last_name = peewee.CharField(default="")
    middle_initial = peewee.CharField(default="")
    network_id = peewee.CharField(null=True, index=True)
    email_address = peewee.CharField(default="")
    encoding = peewee.CharField(default="UTF8")

    class Meta:
        table_name = "users"


class Projects(BaseModel):
    # Pacifica project ids are strings ("1234a").
    id = peewee.CharField(primary_key=True)
    title = peewee.TextField(default="")
    abstract = peewee.TextField(default="")
    science_theme = peewee.CharField(null=True)
    project_type = peewee.CharField(null=True)
    submitted_date = peewee.DateTimeField(null=True, default=utcnow)
    accepted_date = peewee.DateField(null=True)
    actual_start_date = peewee.DateField(null=True)
    actual_end_date = peewee.DateField(null=True)
    closed_date = peewee.DateField(null=True)
    suspense_date = peewee.DateField(null=True)
    encoding = peewee.CharField(default="UTF8")

    class Meta:
        table_name = "projects"


class Instruments(BaseModel):
    id = peewee.AutoField()
    name = peewee.CharField(default="")
    display_name = peewee.CharField(default="")
    name_short = peewee.CharField(default="")
    active = peewee.BooleanField(default=True)
    encoding = peewee.CharField(default="UTF8")

    class Meta:
        table_name = "instruments"


class Groups(BaseModel):
    id = peewee.AutoField()
    name = peewee.CharField(default="")
    display_name = peewee.CharField(default="")
    description = peewee.TextField(default="")
    is_admin = peewee.BooleanField(default=False)
    encoding = peewee.CharField(default="UTF8")

    class Meta:
        table_name = "groups"


class UserGroup(BaseModel):
    id = peewee.AutoField()
    user = peewee.ForeignKeyField(Users, backref="+")
    group = peewee.ForeignKeyField(Groups, backref="+")

    class Meta:
        table_name = "user_group"
        indexes = ((("user", "group"), True),)


class Relationships(BaseModel):
    uuid = peewee.CharField(primary_key=True, max_length=64, default=new_uuid)
    name = peewee.CharField(unique=True)
    display_name = peewee.CharField(default="")
    description = peewee.TextField(default="")

    class Meta:
        table_name = "relationships"


class ProjectUser(BaseModel):
    uuid = peewee.CharField(primary_key=True, max_length=64, default=new_uuid)
    project = peewee.ForeignKeyField(Projects, backref="+")
    user = peewee.ForeignKeyField(Users, backref="+")
    relationship = peewee.ForeignKeyField(Relationships, backref="+")

    class Meta:
        table_name = "project_user"
        indexes = ((("project", "user", "relationship"), True),)


class ProjectInstrument(BaseModel):
    uuid = peewee.CharField(primary_key=True, max_length=64, default=new_uuid)
    project = peewee.ForeignKeyField(Projects, backref="+")
    instrument = peewee.ForeignKeyField(Instruments, backref="+")
    relationship = peewee.ForeignKeyField(Relationships, backref="+")

    class Meta:
        table_name = "project_instrument"
        indexes = ((("project", "instrument", "relationship"), True),)


class InstrumentUser(BaseModel):
    uuid = peewee.CharField(primary_key=True, max_length=64, default=new_uuid)
    instrument = peewee.ForeignKeyField(Instruments, backref="+")
    user = peewee.ForeignKeyField(Users, backref="+")
    relationship = peewee.ForeignKeyField(Relationships, backref="+")

    class Meta:
        table_name = "instrument_user"
        indexes = ((("instrument", "user", "relationship"), True),)


class Transactions(BaseModel):
    # Not an AutoField: ids come from getid (mode upload_job) so they match job ids.
    id = peewee.BigIntegerField(primary_key=True)
    # Nullable because Pacifica's own transaction rows (and its seeds) carry them apart.
    submitter = peewee.ForeignKeyField(Users, null=True, backref="+")
    project = peewee.ForeignKeyField(Projects, null=True, backref="+")
    instrument = peewee.ForeignKeyField(Instruments, null=True, backref="+")
    description = peewee.TextField(null=True)
    suspense_date = peewee.DateField(null=True)

    class Meta:
        table_name = "transactions"


class Files(BaseModel):
    # Ids come from getid (mode file) so the archive and the metadata agree.
    id = peewee.BigIntegerField(primary_key=True)
    name = peewee.TextField()
    subdir = peewee.TextField(default="")
    size = peewee.BigIntegerField()
    mimetype = peewee.CharField(default="application/octet-stream")
    hashtype = peewee.CharField(null=True, max_length=32)
    hashsum = peewee.CharField(null=True, max_length=256)
    mtime = peewee.DateTimeField(null=True)
    ctime = peewee.DateTimeField(null=True)
    transaction = peewee.ForeignKeyField(Transactions, backref="+")
    suspense_date = peewee.DateField(null=True)
    encoding = peewee.CharField(default="UTF8")

    class Meta:
        table_name = "files"


class Keys(BaseModel):
    id = peewee.AutoField()
    key = peewee.CharField(unique=True)
    display_name = peewee.CharField(default="")
    description = peewee.TextField(default="")

    class Meta:
        table_name = "keys"


class Values(BaseModel):
    id = peewee.AutoField()
    value = peewee.TextField(unique=True)
    display_name = peewee.CharField(default="")
    description = peewee.TextField(default="")

    class Meta:
        table_name = "values"


class TransKeyValue(BaseModel):
    id = peewee.AutoField()
    transaction = peewee.ForeignKeyField(Transactions, backref="+")
    key = peewee.ForeignKeyField(Keys, backref="+")
    value = peewee.ForeignKeyField(Values, backref="+")

    class Meta:
        table_name = "trans_key_value"
        indexes = ((("transaction", "key", "value"), True),)


class FileKeyValue(BaseModel):
    id = peewee.AutoField()
    file = peewee.ForeignKeyField(Files, backref="+")
    key = peewee.ForeignKeyField(Keys, backref="+")
    value = peewee.ForeignKeyField(Values, backref="+")

    class Meta:
        table_name = "file_key_value"
        indexes = ((("file", "key", "value"), True),)


class IdCounter(peewee.Model):
    """The next id getid hands out per mode; not an object of the REST interface."""

    mode = peewee.CharField(primary_key=True, max_length=64)
    next_id = peewee.BigIntegerField()

    class Meta:
        database = database
        table_name = "id_counter"


# In foreign-key order: every model comes after the models it references.
OBJECT_MODELS = (Users, Projects, Instruments, Groups, UserGroup, Relationships, ProjectUser,
                 ProjectInstrument, InstrumentUser, Transactions, Files, Keys, Values,
                 TransKeyValue, FileKeyValue)
MODELS = OBJECT_MODELS + (IdCounter,)

SCHEMA = Schema("metadata", [Migration((1, 0), "initial tables", create_tables(*MODELS))])
