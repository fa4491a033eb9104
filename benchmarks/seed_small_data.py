"""The seed guide's "Freeze + Classifier" as a user writes it for a small image
folder, run as its own process by row 8 (benchmarks/small_data.py):

    python benchmarks/seed_small_data.py MODEL CHECKPOINT ROOT EPOCHS BATCH OUT

open_clip builds MODEL and loads CHECKPOINT; the towers are frozen; a linear
classifier on the normalised image features trains with AdamW (Step 7) in the
Step 9 loop, which re-encodes every image in every epoch; top-1 on ROOT/val at
the end; the classifier is saved to OUT. Nothing is cached or skipped.
"""
import sys

import open_clip
import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder


def main(model_name, checkpoint, root, epochs, batch, out):
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name,
                                                                                    pretrained=checkpoint)
    for p in model.parameters():
        p.requires_grad = False
    train = ImageFolder(f"{root}/train", transform=preprocess_train)
    val = ImageFolder(f"{root}/val", transform=preprocess_val)
    embed_dim = model.encode_image(val[0][0][None]).shape[-1]
    classifier = torch.nn.Linear(embed_dim, len(train.classes))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True)
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            features = F.normalize(model.encode_image(images), dim=-1)
            loss = F.cross_entropy(classifier(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val, batch_size=batch):
            correct += (classifier(F.normalize(model.encode_image(images), dim=-1)).argmax(-1) == labels).sum().item()
    torch.save(classifier.state_dict(), out)
    print(f"top1 {correct / len(val):.3f}")


if __name__ == "__main__":
    name, ckpt, root, epochs, batch, out = sys.argv[1:7]
    main(name, ckpt, root, int(epochs), int(batch), out)
