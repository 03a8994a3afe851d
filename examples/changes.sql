-- What upstream jobs change between two syncs.
DELETE FROM audience_memberships WHERE audience_id = 'aud_orders30' AND user_id = 'user_003';
INSERT INTO audience_memberships (audience_id, user_id, anonymous_id, email) VALUES
  ('aud_orders30', 'user_006', NULL, 'barbara@example.com'),
  ('aud_vip', 'user_005', NULL, 'edsger@example.com');
-- Renaming an audience keeps the key it was first synced under.
UPDATE audiences SET name = 'Ordered In The Last Month' WHERE id = 'aud_orders30';
