import pytest

from hmtconv.distributed import all_gather_objects, is_main, shard_indices, world_size


@pytest.mark.parametrize("length", [0, 1, 7, 10, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_index_exactly_once(length, world):
    shards = [shard_indices(length, r, world) for r in range(world)]
    flat = [i for shard in shards for i in shard]
    assert flat == list(range(length))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_identities():
    assert world_size() == 1 and is_main()
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
