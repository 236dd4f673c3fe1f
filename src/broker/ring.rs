//! A round-robin ring: members in join order and a cursor naming whose turn it is.
//!
//! Invariant: `cursor < members.len()`, or `cursor == 0` when the ring is empty. Removing a member
//! keeps the turn with the member that would have been next.

#[derive(Clone, Debug)]
pub struct Ring<T> {
    members: Vec<T>,
    cursor: usize,
}

impl<T> Default for Ring<T> {
    fn default() -> Self {
        Ring {
            members: Vec::new(),
            cursor: 0,
        }
    }
}

impl<T: Copy + PartialEq> Ring<T> {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, member: T) -> bool {
        self.members.contains(&member)
    }

    /// Adds a member at the end of the current round; a member already in the ring stays put.
    pub fn insert(&mut self, member: T) {
        if !self.contains(member) {
            self.members.push(member);
        }
    }

    /// Removes a member; the turn passes to the one after it if it was its turn.
    pub fn remove(&mut self, member: T) {
        let Some(index) = self.members.iter().position(|m| *m == member) else {
            return;
        };
        self.members.remove(index);
        if index < self.cursor {
            self.cursor -= 1;
        }
        if self.cursor >= self.members.len() {
            self.cursor = 0;
        }
    }

    /// The first member from the cursor on that `eligible` accepts; the turn does not move.
    pub fn peek_next(&self, mut eligible: impl FnMut(T) -> bool) -> Option<T> {
        let len = self.members.len();
        (0..len)
            .map(|step| self.members[(self.cursor + step) % len])
            .find(|&m| eligible(m))
    }

    /// Passes the turn to the member after `member`.
    pub fn advance_past(&mut self, member: T) {
        if let Some(index) = self.members.iter().position(|m| *m == member) {
            self.cursor = (index + 1) % self.members.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(ring: &mut Ring<u32>) -> Option<u32> {
        let next = ring.peek_next(|_| true)?;
        ring.advance_past(next);
        Some(next)
    }

    fn ring(members: &[u32]) -> Ring<u32> {
        let mut ring = Ring::default();
        for &m in members {
            ring.insert(m);
        }
        ring
    }

    #[test]
    fn empty_ring_yields_nothing() {
        let mut ring = ring(&[]);
        assert_eq!(take(&mut ring), None);
        ring.remove(7);
        ring.advance_past(7);
        assert!(ring.is_empty());
        assert_eq!(take(&mut ring), None);
    }

    #[test]
    fn round_robin_order() {
        let mut ring = ring(&[1, 2, 3]);
        let turns: Vec<_> = (0..7).filter_map(|_| take(&mut ring)).collect();
        assert_eq!(turns, [1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn insert_is_idempotent() {
        let mut ring = ring(&[1, 2, 1]);
        assert_eq!(ring.len(), 2);
        ring.insert(2);
        assert_eq!(ring.len(), 2);
    }

    #[test]
    fn removing_the_current_member_passes_the_turn_on() {
        let mut ring = ring(&[1, 2, 3]);
        assert_eq!(take(&mut ring), Some(1)); // now 2's turn
        ring.remove(2);
        assert_eq!(take(&mut ring), Some(3));
        assert_eq!(take(&mut ring), Some(1));
    }

    #[test]
    fn removing_the_first_member_keeps_the_turn() {
        let mut ring = ring(&[1, 2, 3]);
        take(&mut ring);
        take(&mut ring); // 3's turn
        ring.remove(1);
        assert_eq!(take(&mut ring), Some(3));
        assert_eq!(take(&mut ring), Some(2));
    }

    #[test]
    fn removing_the_last_member_while_it_is_its_turn_wraps() {
        let mut ring = ring(&[1, 2, 3]);
        take(&mut ring);
        take(&mut ring); // 3's turn
        ring.remove(3);
        assert_eq!(take(&mut ring), Some(1));
        assert_eq!(take(&mut ring), Some(2));
        ring.remove(1);
        ring.remove(2);
        assert!(ring.is_empty());
        assert_eq!(take(&mut ring), None);
    }

    #[test]
    fn peek_skips_ineligible_members_without_moving() {
        let mut ring = ring(&[1, 2, 3]);
        assert_eq!(ring.peek_next(|m| m != 1), Some(2));
        assert_eq!(ring.peek_next(|m| m != 1), Some(2));
        ring.advance_past(2);
        assert_eq!(ring.peek_next(|_| true), Some(3));
        assert_eq!(ring.peek_next(|_| false), None);
    }
}
