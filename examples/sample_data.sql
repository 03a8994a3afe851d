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
