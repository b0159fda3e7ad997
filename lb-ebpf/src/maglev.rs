//! Backend selection: the VIP's Maglev ring, indexed by the shared flow hash.

use lb_common::{Backend, DatapathConfig, NO_BACKEND, VipInfo, maglev_slot};

use crate::maps::{XLB_BACKENDS, XLB_MAGLEV};

/// Backend id in the VIP's live ring for a flow hash, or `None` if the slot is empty
/// (the VIP has no active backend) or the ring is out of range.
#[inline(always)]
pub fn pick(info: &VipInfo, hash: u32, cfg: &DatapathConfig) -> Option<u32> {
    let m = cfg.maglev_table_size;
    let index = info
        .ring
        .checked_mul(m)?
        .checked_add(maglev_slot(hash, m))?;
    let id = *XLB_MAGLEV.get(index)?;
    if id == NO_BACKEND { None } else { Some(id) }
}

/// The backend with this id, if the id is in use.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    if id == NO_BACKEND {
        return None;
    }
    XLB_BACKENDS.get(id).filter(|b| b.family != 0)
}
