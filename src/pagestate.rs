//! One authoritative atomic state per guest page. Every resolution claims a page through a
//! compare-and-swap here first, so a page known to be poisoned can never be copied, continued or
//! zero-filled, whatever races with it (the kernel would silently un-poison it).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// The state of one guest page.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not yet brought in: the first access faults and needs the source.
    Missing = 0,
    /// Claimed by a resolution that is under way.
    InFlight = 1,
    /// Mapped with the source's bytes (or zero, after a removal).
    Present = 2,
    /// Hardware poison: answered with UFFDIO_POISON, forever. Terminal.
    Poisoned = 3,
    /// Dropped by the guest (MADV_DONTNEED/REMOVE): reads zero on its next access.
    Removed = 4,
    /// Poisoned by the handler's fail-stop (source gone, fatal error, closed early) so that no
    /// thread waits forever or reads zeros. Not hardware poison. Terminal.
    Fenced = 5,
    /// Asked of an asynchronous source by background prefetch; its answer resolves it. A fault
    /// on it asks again on the urgent path.
    Requested = 6,
    /// Asked of an asynchronous source for a fault (a thread is blocked on it); its answer
    /// resolves it and wakes the thread.
    Urgent = 7,
}

impl PageState {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => PageState::Missing,
            1 => PageState::InFlight,
            2 => PageState::Present,
            3 => PageState::Poisoned,
            4 => PageState::Removed,
            5 => PageState::Fenced,
            6 => PageState::Requested,
            _ => PageState::Urgent,
        }
    }

    /// True when the page needs nothing more from the source.
    pub fn is_resolved(self) -> bool {
        !matches!(
            self,
            PageState::Missing | PageState::InFlight | PageState::Requested | PageState::Urgent
        )
    }

    /// Whether `self -> to` is a legal transition.
    pub fn can_become(self, to: PageState) -> bool {
        use PageState::*;
        match (self, to) {
            // Real poison found on a fenced page: it stays a marker, now recorded as poison.
            (Fenced, Poisoned) => true,
            // Poison and fences are forever.
            (Poisoned, _) | (Fenced, _) => false,
            (Missing, InFlight) | (Removed, InFlight) => true,
            // A repeated fault on a present page claims it for its (EEXIST-expected) ioctl.
            (Present, InFlight) => true,
            (InFlight, Present) | (InFlight, Missing) | (InFlight, Removed) => true,
            // Known poison, runtime poison, or poison discovered at the source.
            (Missing, Poisoned) | (Present, Poisoned) | (Removed, Poisoned) => true,
            // The guest dropped the page.
            (Missing, Removed) | (Present, Removed) => true,
            // A page that was mapped without us (present before registration; EEXIST).
            (Missing, Present) | (Removed, Present) => true,
            (Missing, Fenced) | (InFlight, Fenced) => true,
            // Asynchronous sources: a claimed page is asked for (background or urgent), a
            // background request is escalated by a fault, and the answer claims it again.
            (InFlight, Requested) | (InFlight, Urgent) | (Requested, Urgent) => true,
            (Requested, InFlight) | (Urgent, InFlight) => true,
            (Requested, Poisoned) | (Urgent, Poisoned) => true,
            (Requested, Fenced) | (Urgent, Fenced) => true,
            // Dropped by the guest (private memory) while its request was out: the answer is
            // discarded and the page reads zero.
            (Requested, Removed) | (Urgent, Removed) => true,
            // A policy said to retry: the page is missing again and its thread faults again.
            (Requested, Missing) | (Urgent, Missing) => true,
            _ => false,
        }
    }
}

/// The states of one region's pages, plus a count of resolved pages kept in step.
#[derive(Debug)]
pub struct PageStates {
    states: Box<[AtomicU8]>,
    resolved: AtomicU64,
}

impl PageStates {
    /// `pages` pages, all Missing.
    pub fn new(pages: usize) -> Self {
        Self {
            states: (0..pages)
                .map(|_| AtomicU8::new(PageState::Missing as u8))
                .collect(),
            resolved: AtomicU64::new(0),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// True for a region without pages.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The state of page `index`.
    pub fn get(&self, index: usize) -> PageState {
        PageState::from_u8(self.states[index].load(Ordering::Acquire))
    }

    /// Pages that are resolved (present, poisoned, removed or fenced).
    pub fn resolved(&self) -> u64 {
        self.resolved.load(Ordering::Acquire)
    }

    /// Moves page `index` to `to` if the transition from its current state is legal; returns the
    /// previous state, or `Err(current)` if it is not.
    pub fn transition(&self, index: usize, to: PageState) -> Result<PageState, PageState> {
        let cell = &self.states[index];
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let from = PageState::from_u8(current);
            if !from.can_become(to) {
                return Err(from);
            }
            match cell.compare_exchange_weak(current, to as u8, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    match (from.is_resolved(), to.is_resolved()) {
                        (false, true) => {
                            self.resolved.fetch_add(1, Ordering::AcqRel);
                        }
                        (true, false) => {
                            self.resolved.fetch_sub(1, Ordering::AcqRel);
                        }
                        _ => {}
                    }
                    return Ok(from);
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Moves page `index` from exactly `from` to `to`; false if it was in another state.
    pub fn transition_from(&self, index: usize, from: PageState, to: PageState) -> bool {
        debug_assert!(from.can_become(to));
        if self.states[index]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        match (from.is_resolved(), to.is_resolved()) {
            (false, true) => {
                self.resolved.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                self.resolved.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        true
    }

    /// Claims page `index` for a resolution that needs content (Missing or Removed ->
    /// InFlight); returns the state it had, or `Err(current)` when it cannot be claimed
    /// (poisoned, present, in flight, fenced).
    pub fn claim(&self, index: usize) -> Result<PageState, PageState> {
        for from in [PageState::Missing, PageState::Removed] {
            if self.transition_from(index, from, PageState::InFlight) {
                return Ok(from);
            }
        }
        Err(self.get(index))
    }

    /// Counts pages in `state`.
    pub fn count(&self, state: PageState) -> u64 {
        self.states
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) == state as u8)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::PageState::*;
    use super::*;

    const ALL: [PageState; 8] = [
        Missing, InFlight, Present, Poisoned, Removed, Fenced, Requested, Urgent,
    ];

    #[test]
    fn poison_and_fences_are_terminal() {
        for to in ALL {
            assert!(!Poisoned.can_become(to), "Poisoned -> {to:?}");
            assert_eq!(Fenced.can_become(to), to == Poisoned, "Fenced -> {to:?}");
        }
    }

    #[test]
    fn states_round_trip_through_their_byte() {
        for s in ALL {
            assert_eq!(PageState::from_u8(s as u8), s);
        }
    }

    #[test]
    fn a_requested_page_is_unresolved_until_answered() {
        let states = PageStates::new(1);
        assert_eq!(states.claim(0), Ok(Missing));
        assert!(states.transition_from(0, InFlight, Requested));
        assert!(states.transition_from(0, Requested, Urgent));
        assert_eq!(states.resolved(), 0);
        assert_eq!(states.claim(0), Err(Urgent));
        assert!(states.transition_from(0, Urgent, InFlight));
        assert!(states.transition_from(0, InFlight, Present));
        assert_eq!(states.resolved(), 1);
    }

    #[test]
    fn a_poisoned_page_cannot_be_claimed() {
        let states = PageStates::new(4);
        assert_eq!(states.transition(1, Poisoned), Ok(Missing));
        assert_eq!(states.claim(1), Err(Poisoned));
        assert_eq!(states.transition(1, Present), Err(Poisoned));
        assert_eq!(states.get(1), Poisoned);
    }

    #[test]
    fn resolved_count_follows_transitions() {
        let states = PageStates::new(3);
        assert_eq!(states.resolved(), 0);
        assert_eq!(states.claim(0), Ok(Missing));
        assert_eq!(states.resolved(), 0);
        states.transition(0, Present).unwrap();
        assert_eq!(states.resolved(), 1);
        states.transition(0, Removed).unwrap();
        assert_eq!(states.resolved(), 1);
        assert_eq!(states.claim(0), Ok(Removed));
        assert_eq!(states.resolved(), 0);
        states.transition(0, Present).unwrap();
        states.transition(1, Poisoned).unwrap();
        states.transition(2, Fenced).unwrap();
        assert_eq!(states.resolved(), 3);
        assert_eq!(states.count(Present), 1);
    }

    #[test]
    fn transition_from_checks_the_exact_state() {
        let states = PageStates::new(1);
        assert!(!states.transition_from(0, InFlight, Present));
        assert!(states.transition_from(0, Missing, InFlight));
        assert!(states.transition_from(0, InFlight, Missing));
        assert_eq!(states.get(0), Missing);
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let states = std::sync::Arc::new(PageStates::new(1000));
        let wins: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let states = states.clone();
                    s.spawn(move || (0..1000).filter(|&i| states.claim(i).is_ok()).count() as u64)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(wins.iter().sum::<u64>(), 1000);
    }
}
