-- Settle earlier reservations (the prelude above does it; no limits are checked): returns
-- the number of keys moved.
return #KEYS - n
