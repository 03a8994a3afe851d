"""Everything that touches the database: schema, connections, migrations and all SQL."""
