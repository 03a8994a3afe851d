-- Sample upstream data: three audiences and their current members.
INSERT INTO audiences (id, name, key, enabled) VALUES
  ('aud_orders30', 'Order Completed Last 30days', NULL, 1),
  ('aud_highvalue', 'High-Value Customers', NULL, 1),
  ('aud_vip', 'VIP''s ✨ List', NULL, 1);

INSERT INTO audience_memberships (audience_id, user_id, anonymous_id, email) VALUES
  ('aud_orders30', 'user_001', 'anon_001', 'ada@example.com'),
  ('aud_orders30', 'user_002', NULL, 'grace@example.com'),
  ('aud_orders30', 'user_003', 'anon_003', NULL),
  ('aud_orders30', 'user_004', NULL, 'alan@example.com'),
  ('aud_highvalue', 'user_001', 'anon_001', 'ada@example.com'),
  ('aud_highvalue', 'user_005', NULL, 'edsger@example.com'),
  ('aud_vip', 'user_002', NULL, 'grace@example.com');

-- A computed trait: one JSON value per user, sent exactly as stored.
INSERT INTO computed_traits (id, name, key, enabled) VALUES
  ('tr_ltv', 'Lifetime Value', NULL, 1);
INSERT INTO computed_trait_values (trait_id, user_id, value) VALUES
  ('tr_ltv', 'user_001', '1250.50'),
  ('tr_ltv', 'user_002', '{"usd": 310, "tier": "silver"}'),
  ('tr_ltv', 'user_005', '99.90');

-- An orders table for the audience settings.toml defines by a query ("Order Completed Last 30
-- Days"): its members are whoever completed an order in the last 30 days, so they drift out as
-- time passes, without any upstream job.
CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, email TEXT,
                     amount REAL NOT NULL, completed_at TEXT NOT NULL);
INSERT INTO orders (user_id, email, amount, completed_at) VALUES
  ('user_001', 'ada@example.com', 120.00, datetime('now', '-2 days')),
  ('user_002', 'grace@example.com', 80.50, datetime('now', '-29 days')),
  ('user_004', 'alan@example.com', 15.00, datetime('now', '-45 days'));
