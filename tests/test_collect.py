"""The coordinator's messenger names sites by their registered names, and learns them cheaply."""

from types import SimpleNamespace

from fedlora import config as cfg
from fedlora.privacy.server import ServerPrivacy
from fedlora.server.collect import Messenger


class ListingGrid:
    """A grid whose node listing is counted: each listing is a round trip to the SuperLink."""

    def __init__(self, nodes):
        self.nodes, self.listings = nodes, 0

    def get_nodes(self):
        self.listings += 1
        return list(self.nodes)


def test_one_listing_names_every_node_it_lists():
    nodes = [SimpleNamespace(node_id=k, name="hospital-a" if k == 7 else "") for k in range(1000)]
    grid = ListingGrid(nodes)
    messenger = Messenger(grid, ServerPrivacy(cfg.load_config(None, [])))
    names = [messenger.name(k) for k in range(1000)]
    assert grid.listings == 1  # not one per unnamed site: 10,000 simulated sites made a start take hours
    assert names[7] == "hospital-a" and names[8] == "node-8"
    grid.nodes.append(SimpleNamespace(node_id=5000, name="hospital-b"))  # a site that joins later
    assert messenger.name(5000) == "hospital-b" and grid.listings == 2
    assert messenger.name(5000) == "hospital-b" and messenger.name(9) == "node-9" and grid.listings == 2
