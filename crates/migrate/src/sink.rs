//! Where the pre-copy engine sends pages: an image file today, a migration
//! transport tomorrow.

use ferry_image::ImageWriter;

/// Receives guest pages round after round; the last write of a page wins.
pub trait PageSink: Send {
    /// A run of contiguous non-zero pages starting at `gpa`.
    fn pages(&mut self, gpa: u64, data: &[u8]) -> crate::Result<()>;
    /// `npages` pages from `gpa` that are now all zero.
    fn zero(&mut self, gpa: u64, npages: u64) -> crate::Result<()>;
    /// Called after each live round: returns once everything sent so far
    /// has reached its destination. A socket sink waits for the peer's
    /// acknowledgement, so that the round's measured rate is the rate pages
    /// are delivered (not the rate they fill socket buffers) and the final
    /// pause does not start behind a backlog. Files need nothing.
    fn sync(&mut self, _round: u32, _pages: u64) -> crate::Result<()> {
        Ok(())
    }
}

impl PageSink for ImageWriter {
    fn pages(&mut self, gpa: u64, data: &[u8]) -> crate::Result<()> {
        Ok(self.write_pages(gpa, data)?)
    }

    fn zero(&mut self, gpa: u64, npages: u64) -> crate::Result<()> {
        Ok(self.write_zero(gpa, npages)?)
    }
}
