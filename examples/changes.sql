-- What upstream jobs change between two syncs.
DELETE FROM audience_memberships WHERE audience_id = 'aud_orders30' AND user_id = 'user_003';
INSERT INTO audience_memberships (audience_id, user_id, anonymous_id, email) VALUES
  ('aud_orders30', 'user_006', NULL, 'barbara@example.com'),
  ('aud_vip', 'user_005', NULL, 'edsger@example.com');
-- Renaming an audience keeps the key it was first synced under.
UPDATE audiences SET name = 'Ordered In The Last Month' WHERE id = 'aud_orders30';
-- A trait value changes, one is removed (sent as null), and 1250.5 is the same value as 1250.50
-- (JSON equality: nothing is sent for it).
UPDATE computed_trait_values SET value = '{"usd": 420, "tier": "gold"}'
  WHERE trait_id = 'tr_ltv' AND user_id = 'user_002';
DELETE FROM computed_trait_values WHERE trait_id = 'tr_ltv' AND user_id = 'user_005';
UPDATE computed_trait_values SET value = '1250.5' WHERE trait_id = 'tr_ltv' AND user_id = 'user_001';
-- Alan orders again: he is back in the last 30 days. Grace's order ages out of the window.
INSERT INTO orders (user_id, email, amount, completed_at) VALUES
  ('user_004', 'alan@example.com', 42.00, datetime('now'));
UPDATE orders SET completed_at = datetime('now', '-31 days') WHERE user_id = 'user_002';
